#!/usr/bin/env bash
# The GPU check: one prepared command for a session with a GPU machine (under 8 minutes
# on an H100). It runs the engine tests on CUDA in fp16, then bench_engine.py --full
# (SD 1.5's architecture, random weights, 512 x 512, 50 steps) collage vs diffusers
# img2img eager / channels-last / torch.compile + channels-last, one run at SDXL size
# (1024 x 1024), and prints one table with the times, ratios and peak GPU memory.
#
#   bash benchmarks/gpu_wheels.sh            # here, once: the wheels the GPU image lacks
#   bash benchmarks/gpu_check.sh             # there (the device tool, carry .whl)
#   bash benchmarks/gpu_check.sh --cpu       # here: the same steps at toy sizes on the CPU
#   bash benchmarks/gpu_check.sh --flow      # there: Flux and SD3 instead (own run, < 8 min)
#   bash benchmarks/gpu_check.sh --cpu --flow
#
# --flow runs the Flux/SD3 engine tests on CUDA in bf16, then bench_engine.py --flux --full
# (Flux.1-dev's transformer, random weights, 1024 x 1024, 28 steps) and --sd3 --full
# (SD3.5-medium-like widths), collage vs FluxImg2ImgPipeline / StableDiffusion3Img2ImgPipeline.
#
# Each step has its own time limit; a step that fails or runs out shows so in the table
# and the next one runs. Results (JSON lines, logs) go to $OUT (or /tmp/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
CPU=0
FLOW=0
for arg in "$@"; do
  [ "$arg" = "--cpu" ] && CPU=1
  [ "$arg" = "--flow" ] && FLOW=1
done
RESULTS=${OUT:-/tmp/gpu_check}
mkdir -p "$RESULTS"
: > "$RESULTS/rows.jsonl"
PY=${PYTHON:-python3}
[ $CPU = 1 ] && [ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1 && [ $CPU = 0 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu_check_site .whl/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"  # only what the image lacks
fi
"$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"

if [ $CPU = 1 ]; then
  TEST_ENV=(PSD_COLLAGE_TEST_DEVICE=cpu PSD_COLLAGE_TEST_DTYPE=fp32)
  SD=(--steps 2 --size 64 --threads 2 --device cpu)
  XL=(--sdxl --steps 2 --size 64 --threads 2 --device cpu)
  LIMITS=(900 900 900 900 1800)  # a shared CPU box: slow, not timed
else
  TEST_ENV=(PSD_COLLAGE_TEST_DEVICE=cuda PSD_COLLAGE_TEST_DTYPE=fp16)
  SD=(--full)
  XL=(--full --sdxl)
  LIMITS=(90 60 60 90 170)  # 470 s in all at most
fi

TESTS=(tests/test_engine_sampling.py tests/test_engine_attention.py tests/test_engine_tokens.py
  tests/test_engine_controlnet.py tests/test_engine_lora.py tests/test_engine_cache.py
  tests/test_shapes_train.py)
if [ $FLOW = 1 ]; then
  TESTS=(tests/test_engine_flow.py tests/test_engine_flow_controlnet.py)
  if [ $CPU = 1 ]; then
    FX=(--flux --steps 2 --size 64 --threads 2 --device cpu)
    S3=(--sd3 --steps 2 --size 64 --threads 2 --device cpu)
  else
    TEST_ENV=(PSD_COLLAGE_TEST_DEVICE=cuda PSD_COLLAGE_TEST_DTYPE=bf16)
    FX=(--flux --full)
    S3=(--sd3 --full)
    LIMITS=(90 210 150)  # 450 s in all at most
  fi
fi

# 1. The engine tests, on the device in its half precision.
start=$(date +%s)
env "${TEST_ENV[@]}" timeout "${LIMITS[0]}" "$PY" -m pytest -q -p no:cacheprovider \
  "${TESTS[@]}" >"$RESULTS/tests.log" 2>&1
status=$?
summary=$(grep -E "^[0-9]+ (passed|failed)|^=+ .*(passed|failed|error)" "$RESULTS/tests.log" | tail -1)
echo "engine tests (exit $status, $(($(date +%s) - start)) s): ${summary:-see tests.log}"
[ $status = 0 ] || grep -E "^(FAILED|ERROR)" "$RESULTS/tests.log" | head -20

# 2. Collage sampling vs diffusers img2img: eager, channels-last, compiled, SDXL size.
bench() {  # name, time limit, bench_engine.py arguments
  local name=$1 limit=$2
  shift 2
  local start=$(date +%s)
  if timeout "$limit" "$PY" benchmarks/bench_engine.py --json "$@" >"$RESULTS/$name.json" \
    2>"$RESULTS/$name.log"; then
    "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); r['name']=sys.argv[2]; \
print(json.dumps(r))" "$RESULTS/$name.json" "$name" >>"$RESULTS/rows.jsonl"
  else
    echo "{\"name\": \"$name\", \"failed\": \"exit $? after $(($(date +%s) - start)) s\"}" \
      >>"$RESULTS/rows.jsonl"
    tail -3 "$RESULTS/$name.log"
  fi
}
if [ $FLOW = 1 ]; then
  bench flux-eager "${LIMITS[1]}" "${FX[@]}"
  bench sd3-eager "${LIMITS[2]}" "${S3[@]}"
else
  bench sd15-eager "${LIMITS[1]}" "${SD[@]}"
  bench sd15-channels-last "${LIMITS[2]}" "${SD[@]}" --channels-last
  bench sdxl-eager "${LIMITS[3]}" "${XL[@]}"
  bench sd15-compile-channels-last "${LIMITS[4]}" "${SD[@]}" --compile --channels-last
fi

# 3. One table.
"$PY" - "$RESULTS/rows.jsonl" <<'PYTABLE'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
gpu = next((r["config"]["gpu"] for r in rows if r.get("config", {}).get("gpu")), None)
print(f"\nbench_engine.py on {gpu or 'CPU'} (medians; ratio = collage / img2img, goal <= 1.05, Flux/SD3 <= 1.10)")
head = ("run", "size", "steps", "dtype", "img2img s", "collage s", "ratio", "peak MiB i2i/collage", "first run s")
print(" | ".join(head))
print(" | ".join("---" for _ in head))
for r in rows:
    if "failed" in r:
        print(f"{r['name']} | failed: {r['failed']}")
        continue
    c = r["config"]
    first = r["first_run_s"]
    print(" | ".join(str(x) for x in (
        r["name"], f"{c['size']}²", f"{c['steps']} ({c['denoising_steps']})", c["dtype"],
        r["img2img_s"], r["collage_s"], r["ratio"],
        f"{r['img2img_peak_mib']} / {r['collage_peak_mib']}",
        f"{first['img2img']} / {first['collage']}",
    )))
PYTABLE
