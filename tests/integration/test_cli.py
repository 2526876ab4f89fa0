"""Bad input through the command line: one clear message, exit status 2, nothing written."""

import subprocess
import sys
from pathlib import Path

import pytest

from dist_lora.cli import main

REPO = Path(__file__).resolve().parents[2]


def _train(capsys: pytest.CaptureFixture[str], *overrides: str) -> tuple[int, str]:
    code = main(["train", *overrides])
    return code, capsys.readouterr().err


def test_missing_model_path(capsys: pytest.CaptureFixture[str], shapes_shards: Path, tmp_path: Path) -> None:
    code, err = _train(capsys, f"model.pretrained={tmp_path / 'nope'}", f"data.shards={shapes_shards}",
                       f"output.dir={tmp_path / 'run'}")
    assert code == 2 and "does not exist" in err and str(tmp_path / "nope") in err
    assert not (tmp_path / "run").exists()


def test_missing_and_empty_dataset(capsys: pytest.CaptureFixture[str], tiny_models: dict[str, Path],
                                   tmp_path: Path) -> None:
    code, err = _train(capsys, f"model.pretrained={tiny_models['sd15']}", f"data.shards={tmp_path / 'none'}",
                       f"output.dir={tmp_path / 'run'}")
    assert code == 2 and "is not a folder" in err
    (tmp_path / "empty").mkdir()
    code, err = _train(capsys, f"model.pretrained={tiny_models['sd15']}", f"data.shards={tmp_path / 'empty'}",
                       f"output.dir={tmp_path / 'run'}")
    assert code == 2 and "manifest.json" in err
    assert main(["prepare", str(tmp_path / "empty"), str(tmp_path / "shards")]) == 2
    assert "no '<repeats>_<name>' sub-folders" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "shards").exists()


def test_config_typo(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _train(capsys, "model.pretrained=x", "data.shards=y", "training.learning_rate=1")
    assert code == 2 and "unknown config key 'training.learning_rate'" in err


def test_unwritable_output(capsys: pytest.CaptureFixture[str], tiny_models: dict[str, Path], shapes_shards: Path,
                           tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _train(capsys, f"model.pretrained={tiny_models['sd15']}", f"data.shards={shapes_shards}",
                       f"output.dir={blocker / 'run'}")
    assert code == 2 and "is not a folder" in err and str(blocker) in err


def test_existing_adapter_is_not_overwritten(capsys: pytest.CaptureFixture[str], tiny_models: dict[str, Path],
                                             shapes_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "dist_lora.safetensors").write_bytes(b"precious")
    code, err = _train(capsys, f"model.pretrained={tiny_models['sd15']}", f"data.shards={shapes_shards}",
                       f"output.dir={run}")
    assert code == 2 and "already exists" in err
    assert (run / "dist_lora.safetensors").read_bytes() == b"precious"


def test_python_m_entry_point_reports_errors() -> None:
    proc = subprocess.run([sys.executable, "-m", "dist_lora.train", "model.pretrained=x", "data.shards=y",
                           "training.batch_size=0"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "training.batch_size': got 0; must be >= 1" in proc.stderr


def test_data_commands_report_and_refuse(capsys: pytest.CaptureFixture[str], tiny_models: dict[str, Path],
                                         shapes_shards: Path, tmp_path: Path) -> None:
    src = tmp_path / "src" / "3_cat"
    src.mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (200, 120), (9, 9, 9)).save(src / "a.png")
    (src / "b.png").write_bytes(b"")
    assert main(["prepare", str(tmp_path / "src"), str(tmp_path / "shards"), "--resolution", "128"]) == 0
    out = capsys.readouterr().out
    assert "found 2 images: 1 accepted, 1 rejected" in out and "3_cat/b.png: empty file (0 bytes)" in out
    assert main(["prepare", str(tmp_path / "src"), str(tmp_path / "bad"), "--resolution", "128",
                 "--min-bucket-side", "100"]) == 2
    assert "bucket min_side 100 must be a multiple of the step 64" in capsys.readouterr().err
    # Too few shards for 2 ranks x 2 workers: refused before any model loads.
    code, err = _train(capsys, f"model.pretrained={tiny_models['sd15']}", f"data.shards={tmp_path / 'shards'}",
                       f"output.dir={tmp_path / 'run'}", "data.num_workers=2")
    assert code == 2 and "1 shard(s) but 1 rank(s) x 2 worker(s)" in err
    assert main(["cache", str(shapes_shards), str(tmp_path / "cached"), "--model", str(tmp_path / "no_model")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "cached").exists()
