"""The editing loop a designer goes through: render, pick, edit, render again, safely.

No silent overwrites, backups that keep the first original, files that keep their
mode and owner, settings recorded in the file, and one-line errors for ordinary
write problems (issue 11).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from psd_tools import PSDImage
from psd_tools.constants import Compression, Resource
from psd_tools.psd import PSD

from psd_collage import atomic
from psd_collage.errors import CollageError
from psd_collage.psd.boundary import layer_records
from psd_collage.psd.history import add_render, find_variant, read_renders, read_renders_from_file
from psd_collage.psd.reader import TYPE_KEPT, read_collage
from psd_collage.psd.writer import write_variants
from psd_collage.render import Renderer, default_output, group_name, resolve_output
from psd_collage.settings import Settings
from tests import readers
from tests.psd_builders import Pixels, build_psd, edit_copy

TINY = {"model": "tiny", "variants": 2, "steps": 2, "seed": 7}


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer(overrides=TINY)


def poster(folder: Path, name: str = "poster.psd") -> Path:
    return build_psd(
        folder / name,
        [
            Pixels("a green lawn", (0, 0, 96, 64), (60, 160, 60)),
            Pixels("a checkered blanket [lock]", (8, 30, 56, 60), (200, 40, 40)),
            Pixels("a white cup", (60, 10, 84, 34), (240, 240, 240)),
        ],
        size=(96, 64),
        description="a white cup on a green lawn",
    )


def variants(size=(64, 96), count=1, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((*size, 3), dtype=np.float32) for _ in range(count)]


def cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "psd_collage.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_error_line(run: subprocess.CompletedProcess, *words: str) -> str:
    assert run.returncode == 2, (run.stdout, run.stderr)
    lines = [line for line in run.stderr.strip().splitlines() if not line.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert "internal error" not in lines[0] and "Traceback" not in run.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# --- 2. no silent overwrites --------------------------------------------------------------


def test_an_existing_output_is_refused_unless_overwrite(tmp_path):
    source = poster(tmp_path)
    output = default_output(source)
    output.write_bytes(b"the designer's edits")
    with pytest.raises(CollageError, match="--overwrite"):
        resolve_output(source, None)
    assert resolve_output(source, None, overwrite=True) == output
    assert output.read_bytes() == b"the designer's edits"


def test_a_harmonized_file_is_not_renamed_again(tmp_path):
    harmonized = tmp_path / "poster.harmonized.psd"
    harmonized.write_bytes(b"x")
    assert default_output(tmp_path / "poster.psd") == harmonized
    with pytest.raises(CollageError, match="--in-place to add one more group"):
        resolve_output(harmonized, None)
    assert resolve_output(harmonized, None, in_place=True) == harmonized


def test_cli_second_render_keeps_the_first_output(tmp_path):
    source = poster(tmp_path)
    output = default_output(source)
    output.write_bytes(b"the designer's edits")
    run = cli("render", str(source), "--model", "tiny", cwd=tmp_path)
    one_error_line(run, str(output), "--overwrite")
    assert output.read_bytes() == b"the designer's edits"


def test_bak_keeps_the_very_first_original(tmp_path):
    source = poster(tmp_path)
    original = source.read_bytes()
    for seed in (1, 2):
        write_variants(source, source, variants(seed=seed), ["seed 1"], f"[harmonized] {seed}")
    assert Path(f"{source}.bak").read_bytes() == original
    assert len([g for g in PSDImage.open(source) if g.name.startswith("[harmonized]")]) == 2


def test_in_place_rerender_adds_one_group_with_a_unique_name(renderer, tmp_path, monkeypatch):
    source = poster(tmp_path, "poster.harmonized.psd")
    original = source.read_bytes()
    from psd_collage import render as render_module

    fixed = render_module.datetime(2026, 11, 25, 14, 3, 7)
    monkeypatch.setattr(render_module, "group_name", lambda m, t: group_name(m, t, fixed))
    renderer.render_file(source, in_place=True)
    renderer.render_file(source, in_place=True)  # the same second: still two names
    groups = [g.name for g in PSDImage.open(source) if g.name.startswith("[harmonized]")]
    assert groups == [
        "[harmonized] 2026-11-25 14:03:07 tiny",
        "[harmonized] 2026-11-25 14:03:07 tiny (2)",
    ]
    assert Path(f"{source}.bak").read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "poster.harmonized.psd",
        "poster.harmonized.psd.bak",
    ]
    assert set(read_renders_from_file(source)) == set(groups)


# --- 5. settings live in the file ----------------------------------------------------------


def test_each_render_is_recorded_in_the_document_xmp(renderer, tmp_path):
    source = poster(tmp_path)
    result = renderer.render_file(source)
    psd = PSDImage.open(result.output)
    group = next(g for g in psd if g.name.startswith("[harmonized]"))
    xmp = psd.image_resources.get_data(Resource.XMP_METADATA)
    assert b"a white cup on a green lawn" in xmp  # File Info's description is kept
    record = read_renders(xmp)[group.name]
    assert record["model"] == "tiny" and record["weights"].startswith("sha256:")
    assert record["prompt"] == "a white cup on a green lawn"
    assert record["variants"] == [{"layer": "seed 7", "seed": 7}, {"layer": "seed 8", "seed": 8}]
    assert (record["steps"], record["guidance"], record["scheduler"]) == (2, 7.0, "euler_ancestral")
    assert record["working_size"][0] % 64 == 0 and record["resolution"] is None
    cup = next(layer for layer in record["layers"] if layer["caption"] == "a white cup")
    assert cup["box"] == [60, 10, 84, 34] and cup["noise"] == 0.6 and cup["id"] > 0
    assert cup["inside"] > 0 and cup["outside"] > 0 and cup["ti"] is False
    assert record["psd_collage"]
    # Readers that share no code with ours read the file, its layers and the record.
    if missing := readers.independent_readers_missing():
        pytest.skip(missing)
    labels = [layer["label"] for layer in readers.identify_layers(result.output)]
    assert labels[-2:] == ["seed 8", "seed 7"]
    ag = readers.ag_psd_read(result.output)
    assert [child["name"] for child in ag["children"][-1]["children"]] == ["seed 8", "seed 7"]
    assert read_renders(ag["xmp"].encode())[group.name] == record


def test_xmp_records_keep_other_metadata_and_accumulate():
    packet = add_render(None, {"group": "g1", "steps": 5})
    packet = add_render(packet, {"group": "g2", "prompt": "ä 🎨 <&>"})
    assert list(read_renders(packet)) == ["g1", "g2"]
    assert read_renders(packet)["g2"]["prompt"] == "ä 🎨 <&>"
    assert read_renders(b"<!DOCTYPE x [<!ENTITY a 'b'>]><x/>") == {}
    record, seed = find_variant({"g": {"variants": [{"layer": "seed 3", "seed": 3}]}}, "g/seed 3")
    assert seed == 3
    with pytest.raises(KeyError, match="no recorded render"):
        find_variant({}, "nope/seed 1")


def test_like_reproduces_one_variant(renderer, tmp_path):
    source = poster(tmp_path)
    first = Renderer(overrides={**TINY, "steps": 3}).render_file(source)
    group = next(g for g in PSDImage.open(first.output) if g.name.startswith("[harmonized]"))
    again = Renderer(overrides={"model": "tiny"}).render_file(
        first.output, tmp_path / "again.psd", like=f"{group.name}/seed 8"
    )
    assert again.settings["steps"] == 3 and [v["seed"] for v in again.variants] == [8]
    assert not any("weights differ" in warning for warning in again.warnings)
    out = PSDImage.open(again.output)
    new = next(g for g in out if g.name != group.name and g.name.startswith("[harmonized]"))
    earlier = {layer.name: layer.numpy()[..., :3] for layer in group}
    redone = new[0].numpy()[..., :3]
    assert (
        np.abs(redone - earlier["seed 8"]).mean() < 0.02 < np.abs(redone - earlier["seed 7"]).mean()
    )
    with pytest.raises(CollageError, match="no recorded render"):
        renderer.render_file(first.output, tmp_path / "x.psd", like="[harmonized] nope/seed 1")


# --- 7. in place keeps mode and owner, links, stale temporary files ------------------------


def test_in_place_keeps_mode_and_owner(tmp_path):
    source = poster(tmp_path)
    source.chmod(0o600)
    owner = (os.getuid(), os.getgid())
    if os.geteuid() == 0:
        owner = (4242, 4343)
        os.chown(source, *owner)
    write_variants(source, source, variants(), ["seed 1"], "[harmonized] a")
    for path in (source, Path(f"{source}.bak")):
        info = path.stat()
        assert stat.S_IMODE(info.st_mode) == 0o600, path
        assert (info.st_uid, info.st_gid) == owner, path


def test_in_place_on_a_link_replaces_the_link_not_its_target(tmp_path):
    target = poster(tmp_path, "real.psd")
    before = target.read_bytes()
    link = tmp_path / "link.psd"
    link.symlink_to(target.name)
    write_variants(link, link, variants(), ["seed 1"], "[harmonized] a")
    assert target.read_bytes() == before
    assert not link.is_symlink() and len(PSDImage.open(link)) == 4
    assert Path(f"{link}.bak").read_bytes() == before


def test_stale_temporary_files_are_removed_on_the_next_write(tmp_path):
    out = tmp_path / "out.psd"
    dead = subprocess.run(["true"]).args and _dead_pid()
    ours_dead = tmp_path / f".out.psd.{atomic._HOST}-{dead}.abc.tmp"
    far_old = tmp_path / ".out.psd.otherhost-12.def.tmp"
    far_new = tmp_path / ".out.psd.otherhost-13.ghi.tmp"
    other_file = tmp_path / ".other.psd.otherhost-12.jkl.tmp"
    for path in (ours_dead, far_old, far_new, other_file):
        path.write_bytes(b"half")
    old = time.time() - atomic.STALE_AFTER_S - 60
    os.utime(far_old, (old, old))
    os.utime(other_file, (old, old))
    atomic.atomic_write_bytes(out, b"new")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([out.name, far_new.name, other_file.name])


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# --- 6. ordinary write problems are one-line errors ----------------------------------------


def test_read_only_output_folder_is_one_line(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(CollageError, match="cannot write here") as info:
        atomic.atomic_write_bytes(tmp_path / "out.psd", b"x")
    assert "out.psd" in str(info.value)


def test_output_problems_are_one_line_exit_2(tmp_path):
    source = poster(tmp_path)
    (tmp_path / "folder").mkdir()
    for output, words in [
        ("", ("-o/--output is empty",)),
        (str(tmp_path / "folder"), ("is a folder",)),
        ("/proc/out.psd", ("/proc/out.psd", "cannot write here")),
    ]:
        run = cli(
            "render", str(source), "-o", output, "--model", "tiny", "--variants", "1",
            "--steps", "2", cwd=tmp_path,  # 1 step at noise 0.6 would warn (before the error)
        )  # fmt: skip
        one_error_line(run, *words)


def test_fifo_input_is_refused_at_once(tmp_path):
    fifo = tmp_path / "pipe.psd"
    os.mkfifo(fifo)
    for command in ("render", "inspect"):
        run = cli(command, str(fifo), cwd=tmp_path, timeout=120)
        one_error_line(run, str(fifo), "not a regular file")


def test_inspect_on_a_folder_or_unreadable_file_is_one_line(tmp_path):
    run = cli("inspect", str(tmp_path), cwd=tmp_path)
    one_error_line(run, str(tmp_path), "folder")
    run = cli("inspect", str(tmp_path / "missing.psd"), cwd=tmp_path)
    one_error_line(run, "missing.psd")


def test_sidecar_with_nan_is_one_line(tmp_path):
    source = poster(tmp_path)
    Path(f"{source}.toml").write_text("ti_lr = nan\n")
    run = cli("render", str(source), "--model", "tiny", cwd=tmp_path)
    one_error_line(run, "ti_lr", "finite")


def _corrupt_layer(source: Path, dest: Path, name: str) -> Path:
    with open(source, "rb") as fh:
        document = PSD.read(fh)
    info = layer_records(document)
    for record, channels in zip(info.layer_records, info.channel_image_data, strict=True):
        if record.name == name:
            for channel in channels:  # a ZIP stream that is not one
                channel.compression = Compression.ZIP
                channel.data = b"\x78\x9c" + b"\xff" * 40
    with open(dest, "wb") as fh:
        document.write(fh)
    return dest


def test_damaged_layer_data_names_the_layer_unless_lenient(tmp_path):
    source = poster(tmp_path)
    bad = _corrupt_layer(source, tmp_path / "bad.psd", "a white cup")
    with pytest.raises(CollageError, match=r"a white cup.*damaged.*--lenient"):
        read_collage(bad)
    collage = read_collage(bad, Settings(lenient=True))
    assert any("black" in warning for warning in collage.warnings)
    one_error_line(cli("inspect", str(bad), cwd=tmp_path), "'a white cup'", "--lenient")
    run = cli("inspect", str(bad), "--lenient", cwd=tmp_path)
    assert run.returncode == 0 and "replaced with black" in run.stdout


# --- 4. inspect shows what render will do ---------------------------------------------------


def test_inspect_shows_prompt_noise_sources_redo_ti_and_earlier_renders(tmp_path):
    long_name = "a very long caption about a checkered picnic blanket on the grass [noise=0.2, ti]"
    source = build_psd(
        tmp_path / "p.psd",
        [
            Pixels("a green lawn", (0, 0, 96, 64), (60, 160, 60)),
            Pixels(long_name, (8, 30, 56, 60), (200, 40, 40)),
            Pixels("a white cup", (50, 5, 90, 40), (240, 240, 240)),
        ],
        size=(96, 64),
        description="a picnic",
    )
    Path(f"{source}.toml").write_text('[layers."a white cup"]\nnoise = 0.9\n')
    write_variants(
        source,
        source,
        variants(),
        ["seed 5"],
        "[harmonized] 2026-11-25 14:03:07 tiny",
        record={"model": "tiny", "steps": 9, "variants": [{"layer": "seed 5", "seed": 5}]},
    )
    run = cli("inspect", str(source), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    text = run.stdout
    assert "sampled:  a picnic, a green lawn, a very long caption" in text
    rows = [line for line in text.splitlines() if line[:1].isdigit()]
    assert " 0.20  tag " in text and " 0.90  sidecar " in text and " 0.60  default " in text
    flat = " ".join(text.split())
    assert "[noise=0.2, ti]" in flat  # wrapped, never cut
    assert "…" not in text
    assert len(rows) == 3
    assert "earlier renders (1, oldest first):" in text
    assert "[harmonized] 2026-11-25 14:03:07 tiny: tiny" in text and "9 steps" in text
    data = json.loads(cli("inspect", str(source), "--json", cwd=tmp_path).stdout)
    assert data["document"]["final_prompt"].startswith("a picnic, a green lawn")
    layers = {layer["caption"]: layer for layer in data["layers"]}
    assert layers["a white cup"]["noise_source"] == "sidecar"
    assert layers[long_name.split(" [")[0]]["ti"] is True
    assert data["renders"][0]["settings"]["steps"] == 9


# --- 9. tags and names ----------------------------------------------------------------------


def test_tag_typo_gets_a_suggestion_and_a_duplicate_tag_is_an_error(tmp_path):
    for name, words in [
        ("a cup [nosie=0.2]", "did you mean 'noise'?"),
        ("a cup [noise=0.2, noise=0.5]", "given twice"),
        ("a cup [ti, ti=off]", "given twice"),
    ]:
        path = build_psd(tmp_path / "t.psd", [Pixels(name, (0, 0, 32, 32))], size=(32, 32))
        with pytest.raises(CollageError, match=words.replace("?", r"\?")):
            read_collage(path)


def test_control_characters_in_names_never_reach_the_terminal(tmp_path):
    evil = "a cup\x1b[2J\x1b]0;owned\x07 \u202eevil"
    path = build_psd(
        tmp_path / "c.psd",
        [Pixels("a lawn", (0, 0, 32, 32)), Pixels(evil + " [nosie=1]", (0, 0, 8, 8))],
        size=(32, 32),
    )
    run = cli("inspect", str(path), cwd=tmp_path)
    one_error_line(run, "\\x1b[2J", "\\u202e")
    assert "\x1b" not in run.stderr and "\x07" not in run.stderr
    ok = build_psd(
        tmp_path / "d.psd",
        [Pixels("a lawn", (0, 0, 32, 32)), Pixels(evil, (0, 0, 8, 8))],
        size=(32, 32),
    )
    run = cli("inspect", str(ok), cwd=tmp_path)
    assert run.returncode == 0 and "\\x1b[2J" in run.stdout
    assert not any(ch in run.stdout for ch in "\x1b\x07\u202e")


# --- 1. a moved [redo] layer leaves no ghost ------------------------------------------------


def picnic(folder: Path, cup: tuple[int, int, int, int] = (24, 48, 48, 72)) -> Path:
    rng = np.random.default_rng(3)
    blanket = np.concatenate(
        [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), np.full((40, 56, 1), 255, np.uint8)],
        axis=2,
    )
    return build_psd(
        folder / "picnic.psd",
        [
            Pixels("a green lawn", (0, 0, 128, 96), (60, 160, 60)),
            Pixels("a checkered blanket [lock]", (8, 40, 64, 80), rgba=blanket),
            Pixels("a white cup", cup, (240, 240, 240)),
        ],
        size=(128, 96),
        description="a white cup on a checkered blanket on a green lawn",
    )


def moved(source: Path, dest: Path, name: str, new_name: str, offset: tuple[int, int]) -> Path:
    psd = PSDImage.open(source)
    layer = next(layer for layer in psd.descendants() if layer.name == name)
    layer.offset = offset
    layer.name = new_name
    psd.save(dest)
    return dest


def without_layer_ids(path: Path) -> Path:
    """The file as psd-tools, ag-psd and other scripts write it: no Photoshop layer ids."""
    from psd_tools.constants import Tag
    from psd_tools.psd import PSD

    with open(path, "rb") as fh:
        document = PSD.read(fh)
    for record in layer_records(document).layer_records:
        if Tag.LAYER_ID in record.tagged_blocks:
            del record.tagged_blocks[Tag.LAYER_ID]
    with open(path, "wb") as fh:
        document.write(fh)
    assert all(layer.layer_id <= 0 for layer in PSDImage.open(path).descendants())
    return path


@pytest.mark.parametrize("ids", ["photoshop ids", "no ids"])
def test_moved_redo_layer_regenerates_the_place_it_left(renderer, tmp_path, ids):
    source = picnic(tmp_path)
    if ids == "no ids":
        without_layer_ids(source)
    first = renderer.render_file(source)
    written = PSDImage.open(first.output)
    layer_ids = [layer.layer_id for layer in written.descendants()]
    assert min(layer_ids) > 0 and len(set(layer_ids)) == len(layer_ids)  # as Photoshop saves
    edited = moved(
        first.output, tmp_path / "edited.psd", "a white cup", "a white cup [redo]", (80, 30)
    )
    collage = read_collage(edited)
    from psd_collage import masks

    left = masks.vacated_mask(collage)
    assert left is not None and left[48:72, 24:48].all() and left.sum() == 24 * 24
    second = renderer.render_file(edited, tmp_path / "second.psd")

    groups = [g for g in PSDImage.open(second.output) if g.name.startswith("[harmonized]")]
    base = next(v for v in groups[0] if v.name == "seed 7").numpy()[..., :3]
    new = next(v for v in groups[1] if v.name == "seed 7").numpy()[..., :3]
    blanket = PSDImage.open(source)[1].numpy()[..., :3]  # the locked layer's own pixels
    spot = (slice(48, 72), slice(24, 48))  # where the cup was: all on the blanket
    # The locked blanket comes back exactly where the cup left it, not the base's cup.
    np.testing.assert_array_equal(new[spot], blanket[8:32, 16:40])
    assert np.abs(base[spot] - blanket[8:32, 16:40]).mean() > 0.1
    far = np.ones(new.shape[:2], bool)
    far[:, 60:] = False  # away from the cup's new place and its feathered edge
    far[spot] = False
    np.testing.assert_array_equal(new[far], base[far])  # the rest stays the chosen variant


def test_the_place_left_on_an_unlocked_layer_is_regenerated_and_inspect_shows_it(tmp_path):
    source = picnic(tmp_path, cup=(48, 48, 80, 72))  # half on the locked blanket, half on lawn
    base = tmp_path / "base.psd"
    write_variants(
        source,
        base,
        variants((96, 128)),
        ["seed 1"],
        "[harmonized] g",
        record={
            "layers": [
                {"id": layer.layer_id, "box": list(layer.box)}
                for layer in read_collage(source).layers
            ]
        },
    )
    edited = moved(base, tmp_path / "e.psd", "a white cup", "a white cup [redo]", (90, 4))
    from psd_collage import masks

    collage = read_collage(edited)
    noise = masks.noise_map(collage)
    assert noise[48:72, 48:64].max() == 0.0  # the blanket under the old place: kept
    assert noise[48:72, 64:80].min() == pytest.approx(0.6)  # the lawn there: regenerated
    assert noise[4:28, 90:122].min() > 0.5  # the cup's new place
    start = masks.start_image(collage)
    assert (start[50:70, 66:78] == (60, 160, 60)).all()  # starts from the lawn, not the cup
    text = cli("inspect", str(edited), cwd=tmp_path).stdout
    assert "moved:    'a white cup [redo]' from box [48, 48, 80, 72] to [90, 4, 122, 28]" in text
    assert "left 768 px" in text and "384 px of them under locked layers" in text
    data = json.loads(cli("inspect", str(edited), "--json", cwd=tmp_path).stdout)
    assert data["document"]["left_by_redo"] == {"pixels": 768, "locked_pixels": 384}


# --- 3. type layers stay live ---------------------------------------------------------------


def test_type_layers_stay_live_above_the_output(renderer, fixtures_dir, tmp_path):
    source = fixtures_dir / "text.psd"  # a photo and a type layer on top (Photoshop CS5)
    collage = read_collage(source)
    assert [layer.name for layer in collage.layers] == ["Background"]
    assert collage.live_above == ["Line 1 Line 2 Line 3 and text"]
    result = renderer.render_file(source, tmp_path / "out.psd")
    out = PSDImage.open(result.output)
    assert [layer.kind for layer in out] == ["pixel", "group", "type"]  # the text on top
    assert out[1].name.startswith("[harmonized]")
    variant = out[1][-1].numpy()[..., :3]
    merged = np.asarray(out.topil().convert("RGB"), np.float32) / 255.0
    text = out[2]
    left, top, right, bottom = text.bbox
    inside = np.abs(merged[top:bottom, left:right] - variant[top:bottom, left:right]).max()
    outside = merged.copy()
    outside[top:bottom, left:right] = variant[top:bottom, left:right]
    assert inside > 0.2  # the flattened image shows the live text over the variant
    np.testing.assert_allclose(outside, variant, atol=1 / 255)
    if missing := readers.independent_readers_missing():
        pytest.skip(missing)
    ag = readers.ag_psd_read(result.output)
    assert [child["name"] for child in ag["children"]] == [
        "Background",
        out[1].name,
        "Line 1 Line 2 Line 3 and text",
    ]
    assert len(readers.identify_layers(result.output)) == 1 + 4  # merged + 4 layer records


def test_a_tagged_type_layer_takes_part_and_the_output_goes_above_it(tmp_path, fixtures_dir):
    tagged = edit_copy(
        fixtures_dir / "text.psd",
        tmp_path / "t.psd",
        rename={"Line 1 Line 2 Line 3 and text": "a headline [noise=0.2]"},
    )
    collage = read_collage(tagged)
    assert [layer.caption for layer in collage.layers] == ["", "a headline"]
    assert collage.output_at is None and collage.live_above == []


def test_type_layers_below_the_output_are_kept_exactly(fixtures_dir):
    collage = read_collage(fixtures_dir / "pen-text.psd")  # type under a shape on top
    kept = [layer for layer in collage.layers if layer.noise_source == TYPE_KEPT]
    assert sorted(layer.name for layer in kept) == ["Vodka vodka", "Борис ельцин"]
    assert all(layer.noise == 0.0 and not layer.caption for layer in kept)
    assert collage.output_at is None and collage.live_above == []
    assert not any("Vodka" in warning for warning in collage.warnings)  # not "a default name"
