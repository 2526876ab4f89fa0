"""The dataset audit: planted near-duplicates, train/val leakage and train/reg copies are found, captions
without the trigger or over the token limit are named, tag coverage is counted; in prepare's report.json
and in `dist-lora audit`."""

from __future__ import annotations

import io
import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_lora.cli import main
from dist_lora.data.audit import AuditItem, audit, near_groups
from dist_lora.data.kohya import scan_images
from dist_lora.data.prepare import PrepareOptions, prepare_dataset
from dist_lora.data.prepare_sources import split_validation


def _smooth(seed: int, size: int = 128) -> Image.Image:
    """A picture of its own (seed): smooth colour fields, which perceptual hashes tell apart."""
    g = np.random.default_rng(seed)
    return Image.fromarray(g.integers(0, 255, (6, 6, 3), dtype=np.uint8)).resize((size, size),
                                                                                   Image.Resampling.BICUBIC)


def _copy_of(image: Image.Image) -> Image.Image:
    """What a scraped duplicate looks like: resized and re-encoded as JPEG."""
    buffer = io.BytesIO()
    image.resize((96, 96), Image.Resampling.LANCZOS).save(buffer, "JPEG", quality=75)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def test_near_groups_equal_a_brute_force_over_pairs() -> None:
    g = np.random.default_rng(1)
    hashes = [f"{int(v):016x}" for v in g.integers(0, 2**63, 40, dtype=np.int64)]
    base = int(hashes[0], 16)
    hashes += [f"{base ^ (1 << 3) ^ (1 << 40):016x}", f"{base ^ 0b111:016x}"]  # 2 and 3 bits from the first
    linked = {(i, j) for i, j in combinations(range(len(hashes)), 2)
              if bin(int(hashes[i], 16) ^ int(hashes[j], 16)).count("1") <= 4}
    groups = near_groups(hashes, 4)
    in_groups = {(i, j) for group in groups for i, j in combinations(sorted(group), 2)}
    assert linked and linked <= in_groups
    assert [0, 40, 41] in [sorted(g) for g in groups]


def test_audit_items() -> None:
    a, b = "ffff0000ffff0000", "0f0f0f0f0f0f0f0f"
    near_a = f"{int(a, 16) ^ 0b11:016x}"
    items = [AuditItem("t/a.png", "train", a, "ohwx, cat, red"), AuditItem("t/a2.png", "train", near_a, "cat"),
             AuditItem("v/a.png", "val", a, "ohwx, cat"), AuditItem("t/b.png", "train", b, "ohwx, dog"),
             AuditItem("r/b.png", "reg", b, "dog")]
    report = audit(items, trigger="ohwx")
    assert report.duplicate_groups == [["t/a.png", "t/a2.png"]]
    assert report.leakage == [["t/a.png", "t/a2.png", "v/a.png"]]
    assert report.train_reg == [["r/b.png", "t/b.png"]]
    assert report.without_trigger == ["t/a2.png"]  # regularization images are not expected to hold it
    assert dict(report.tag_images) == {"ohwx": 3, "cat": 3, "red": 1, "dog": 1}
    assert report.token_check == "no tokenizer given"


def _dataset(root: Path) -> tuple[Path, Path]:
    src, reg = root / "src" / "5_cat", root / "reg" / "1_cat"
    src.mkdir(parents=True)
    reg.mkdir(parents=True)
    for i in range(6):
        _smooth(i).save(src / f"img{i}.png")
        (src / f"img{i}.txt").write_text("ohwx, cat" if i % 2 == 0 else "cat, sitting")
    _copy_of(_smooth(0)).save(src / "scraped_copy.jpg")
    (src / "scraped_copy.txt").write_text("ohwx, cat, " + " ".join(["red"] * 100))  # ~105 CLIP tokens
    _smooth(3).save(reg / "reg_copy.png")
    _smooth(20).save(reg / "reg_own.png")
    return root / "src", root / "reg"


def test_prepare_reports_the_audit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, reg = _dataset(tmp_path)
    images = list(scan_images(src))
    _, held = split_validation(images, 0.2)
    assert held, "the split holds out at least one image"
    leaked = held[0]
    for n in range(100):  # a name the split keeps in training, leaving the held-out set as it was
        copy = src / "5_cat" / f"leaked_{n}.png"
        Image.open(leaked.path).save(copy)
        kept, now_held = split_validation(list(scan_images(src)), 0.2)
        if [i.relative for i in now_held] == [i.relative for i in held]:
            break
        copy.unlink()
    else:
        raise AssertionError("no name kept in training")
    copy_name = f"5_cat/{copy.name}"
    assert copy_name in {i.relative for i in kept}
    report = prepare_dataset(src, tmp_path / "out", PrepareOptions(resolution=64, reg_src=str(reg),
                                                                  val_fraction=0.2, trigger="ohwx"))
    audit_json = json.loads((tmp_path / "out" / "report.json").read_text())["audit"]
    assert audit_json == report.audit.to_json()  # type: ignore[union-attr]
    groups = {tuple(g) for g in audit_json["near_duplicates"]}
    assert ("5_cat/img0.png", "5_cat/scraped_copy.jpg") in groups
    # Only the held-out image with a copy in training leaks.
    assert [sorted(g) for g in audit_json["train_val_leakage"]] == [sorted([leaked.relative, copy_name])]
    assert audit_json["train_reg_duplicates"] == [["5_cat/img3.png", "reg/1_cat/reg_copy.png"]]
    assert set(audit_json["without_trigger"]) == {"5_cat/img1.png", "5_cat/img3.png", "5_cat/img5.png",
                                                  copy_name}  # validation images too; the copy has no caption
    assert audit_json["token_check_skipped"] == "no tokenizer given"
    assert audit_json["tag_coverage"]["images_per_tag"]["cat"] == 8
    # The hashes are kept with the encoded images: a re-run decodes nothing and reports the same audit.
    again = prepare_dataset(src, tmp_path / "out", PrepareOptions(resolution=64, reg_src=str(reg),
                                                                 val_fraction=0.2, trigger="ohwx"))
    assert again.encoded == 0 and again.audit.to_json() == report.audit.to_json()  # type: ignore[union-attr]
    # The samples' records carry no hash.
    assert "phash" not in (tmp_path / "out" / "train-000000.tar").read_bytes().decode("latin-1")

    assert main(["audit", str(src), "--reg", str(reg), "--val-fraction", "0.2", "--trigger", "ohwx", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["train_reg_duplicates"] == audit_json["train_reg_duplicates"]


def test_caption_tokens_with_the_models_tokenizer(tiny_models: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = _dataset(tmp_path)
    assert main(["audit", str(src), "--tokenizer", str(tiny_models["sd15"])]) == 0
    out = capsys.readouterr().out
    assert "1 over the token limit" in out and "scraped_copy.jpg" in out
    assert main(["audit", str(src), "--tokenizer", str(tiny_models["sd15"]), "--max-token-length", "225"]) == 0
    assert "0 over the token limit" in capsys.readouterr().out
    assert main(["audit", str(src), "--tokenizer", str(tmp_path)]) == 2
    assert "is not a CLIP tokenizer folder" in capsys.readouterr().err
