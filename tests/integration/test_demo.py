"""The README's demo command, run for real."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[2]
DIST_LORA = str(Path(sys.executable).parent / "dist-lora")  # the console script of this environment


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run([DIST_LORA, "demo", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter = out / "run" / "demo_lora.safetensors"
    assert f"adapter:          {adapter}" in proc.stdout
    with safe_open(str(adapter), framework="pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
        assert any(k.startswith("lora_unet_input_blocks_") for k in f.keys())  # noqa: SIM118 (safe_open is not a dict)
    match = re.search(r"mean of first 5 steps ([\d.]+)\) -> end [\d.]+ \(mean of last 5 steps ([\d.]+)\)", proc.stdout)
    assert match, proc.stdout[-2000:]
    start, end = float(match[1]), float(match[2])
    assert end < 0.95 * start
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert summary["steps"] == 200
    # Sample rounds of the base model and of the trained adapter, and the trained one differs.
    rounds = sorted(p.name for p in (out / "run" / "samples").iterdir())
    assert rounds == ["step-00000000", "step-00000200"]
    before, after = (Image.open(out / "run" / "samples" / r / "00-dlsks-red-square.png") for r in rounds)
    assert before.size == after.size == (128, 128) and before.tobytes() != after.tobytes()
    # Running it again reuses its own folder.
    again = subprocess.run([DIST_LORA, "demo", "--out", str(out), "--steps", "5"], cwd=REPO, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
