# Two commands from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The light CPU build of torch; for an NVIDIA GPU see README ("GPU").
TORCH  ?= torch==2.13.0

.PHONY: demo test lint format bench clean ccx

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# A shapes collage (daylight objects pasted onto a night scene) harmonized by the trained
# `shapes` model that ships in the package.
demo: $(VENV)/.installed
	mkdir -p out
	$(PY) -m psd_collage.shapes.demo out/shapes.psd
	$(VENV)/bin/psd-collage render out/shapes.psd --model shapes --variants 2 --seed 1 --steps 30 -o out/shapes.harmonized.psd --preview --overwrite
	$(PY) -m psd_collage.shapes.demo --figure out/shapes-side-by-side.png out/shapes.psd out/shapes.harmonized.psd
	@echo "open out/shapes.harmonized.psd in Photoshop (or see out/shapes-side-by-side.png: input, the variants, the true night colours)"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# pytest's summary lists each skipped test with what to install to run it (README,
# "What the tests skip"). The panel's Node tests run even when pytest fails; make test
# fails if either did. Without node they are skipped (an error in CI, which installs it).
test: lint
	@status=0; \
	$(PY) -m pytest -q || status=1; \
	if command -v node >/dev/null 2>&1; then \
	  PSD_COLLAGE_PYTHON=$(PY) node --test photoshop/test/ || status=1; \
	elif [ -n "$$CI" ]; then \
	  echo "error: node is not installed: the panel's tests (photoshop/test) cannot run"; status=1; \
	else \
	  echo "SKIPPED photoshop/test (the panel's Node tests): node is not installed (apt-get install nodejs)"; \
	fi; \
	exit $$status

# The Photoshop panel as a .ccx (a zip of photoshop/plugin/): see README, "Photoshop panel".
CCX ?= photoshop/psd-collage.ccx
ccx: $(CCX)
$(CCX): $(wildcard photoshop/plugin/*)
	$(PYTHON) -c "import shutil, sys; shutil.make_archive(sys.argv[1], 'zip', 'photoshop/plugin')" $(basename $@)
	mv $(basename $@).zip $@

format: $(VENV)/.installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_engine.py
	$(PY) benchmarks/bench_psd_io.py
	$(PY) benchmarks/bench_watch.py
	$(PY) benchmarks/bench_ti.py
	$(PY) benchmarks/bench_farm.py
	$(PY) benchmarks/bench_serve.py
	$(PY) benchmarks/bench_editing.py

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
