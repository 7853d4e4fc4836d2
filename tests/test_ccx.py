"""``make ccx``: the Photoshop panel packaged as a .ccx, the plugin folder zipped."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "photoshop" / "plugin"


def test_make_ccx_zips_the_plugin_with_its_manifest_at_the_root(tmp_path: Path) -> None:
    target = tmp_path / "psd-collage.ccx"
    subprocess.run(["make", "-s", "ccx", f"CCX={target}"], cwd=REPO, check=True, timeout=60)
    with zipfile.ZipFile(target) as ccx:
        names = sorted(n for n in ccx.namelist() if not n.endswith("/"))
        manifest = json.loads(ccx.read("manifest.json"))
    assert names == sorted(str(p.relative_to(PLUGIN)) for p in PLUGIN.rglob("*") if p.is_file())
    assert manifest["manifestVersion"] == 5 and manifest["main"] in names
