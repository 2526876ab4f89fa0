"""`dist-lora tag` with a tiny WD14 tagger of the real format (an ONNX model exported here, NHWC BGR input,
sigmoid outputs, selected_tags.csv with the real columns): the tags are exactly those a numpy computation
of kohya's rules gives; files are written as specified; two processes write what one does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dist_lora.captioning.files import CaptionFiles
from dist_lora.captioning.tagging import tag_folder
from dist_lora.captioning.wd14 import TagOptions, Wd14Tagger
from dist_lora.cli import main
from dist_lora.errors import DistLoraError
from tests.integration.distributed_helpers import REPO, free_port

SIDE = 32
TAGS = [("9", "general"), ("9", "sensitive"), ("9", "questionable"), ("9", "explicit"),
        ("0", "red_background"), ("0", "blue_sky"), ("0", "1girl"), ("0", "solo"), ("0", "^_^"),
        ("0", "green_theme"), ("4", "hatsune_miku"), ("4", "alice_(wonderland)")]


class _Tagger(nn.Module):
    """probs = sigmoid(W @ mean BGR / 255 + b): a known function of each image's mean colour."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, nchw: bool = False) -> None:
        super().__init__()
        self.pixels = (2, 3) if nchw else (1, 2)
        self.linear = nn.Linear(3, len(TAGS))
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(x.mean(dim=self.pixels) / 255.0))


def _weights() -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(0)
    return g.normal(0, 4, (len(TAGS), 3)).astype(np.float32), g.normal(0, 1, len(TAGS)).astype(np.float32)


def _export(folder: Path, nchw: bool = False) -> Path:
    folder.mkdir(parents=True)
    weight, bias = _weights()
    model = _Tagger(torch.from_numpy(weight), torch.from_numpy(bias), nchw).eval()
    shape = (1, 3, SIDE, SIDE) if nchw else (1, SIDE, SIDE, 3)
    torch.onnx.export(model, (torch.zeros(shape),), str(folder / "model.onnx"), input_names=["input_1"],
                      output_names=["predictions_sigmoid"], dynamic_axes={"input_1": {0: "batch"},
                                                                           "predictions_sigmoid": {0: "batch"}},
                      dynamo=False)
    rows = ["tag_id,name,category,count"] + [f"{1000 + i},{name},{cat},{500 - i}" for i, (cat, name) in
                                              enumerate(TAGS)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def tagger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory.mktemp("tagger") / "wd-tiny-tagger")


COLOURS = [(250, 20, 20), (20, 40, 240), (30, 200, 60), (128, 128, 128), (250, 250, 10), (10, 10, 10), (90, 20, 160)]


def _images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, colour in enumerate(COLOURS):
        path = folder / f"img{i}.png"
        Image.new("RGB", (SIDE, SIDE), colour).save(path)
        paths.append(path)
    return paths


def _expected(colour: tuple[int, int, int], opts: TagOptions) -> list[str]:
    """kohya's selection, restated: probabilities from the image's mean BGR colour."""
    weight, bias = _weights()
    bgr = np.array(colour[::-1], dtype=np.float64) / 255.0
    probs = 1 / (1 + np.exp(-(weight.astype(np.float64) @ bgr + bias)))
    names = [n.replace("_", " ") if opts.remove_underscore and len(n) > 3 else n for _, n in TAGS]
    general = [names[i] for i, (c, _) in enumerate(TAGS) if c == "0" and probs[i] >= opts.general_threshold
               and names[i] not in opts.undesired_tags]
    character = [names[i] for i, (c, _) in enumerate(TAGS) if c == "4" and probs[i] >= opts.character_threshold
                 and names[i] not in opts.undesired_tags]
    tags = (character[::-1] + general) if opts.character_tags_first else general + character
    rating = names[int(np.argmax(probs[:4]))]
    if opts.use_rating_tags:
        tags = [rating, *tags]
    elif opts.use_rating_tags_as_last_tag:
        tags = [*tags, rating]
    for tag in opts.always_first_tags:
        if tag in tags:
            tags = [tag] + [t for t in tags if t != tag]
    return tags


OPTIONS = [TagOptions(),
           TagOptions(general_threshold=0.2, character_threshold=0.6, remove_underscore=True,
                      use_rating_tags=True, character_tags_first=True),
           TagOptions(general_threshold=0.5, character_threshold=0.1, undesired_tags=frozenset({"solo", "^_^"}),
                      always_first_tags=("1girl", "blue_sky"), use_rating_tags_as_last_tag=True)]


@pytest.mark.parametrize("opts", OPTIONS, ids=["defaults", "rating-first", "undesired-always-first"])
def test_tags_are_kohyas_rule_over_the_models_outputs(opts: TagOptions, tagger: Path, tmp_path: Path) -> None:
    paths = _images(tmp_path / "images")
    report = tag_folder(tmp_path / "images", str(tagger), opts, CaptionFiles(".txt"), batch_size=3, progress=False)
    assert report.captioned == len(COLOURS) and report.kept == 0 and not report.unreadable
    written = {p.name: p.with_suffix(".txt").read_text() for p in paths}
    expected = {p.name: ", ".join(_expected(c, opts)) for p, c in zip(paths, COLOURS, strict=True)}
    assert written == expected
    assert any(written.values()) and len(set(written.values())) > 2  # the thresholds select, per image
    counts: dict[str, int] = {}
    for text in expected.values():
        for tag in filter(None, text.split(", ")):
            counts[tag] = counts.get(tag, 0) + 1
    assert dict(report.frequency) == counts


def test_preprocessing_pads_white_and_is_bgr(tagger: Path) -> None:
    model = Wd14Tagger(tagger)
    wide = Image.new("RGB", (SIDE, SIDE // 2), (10, 20, 30))
    array = model.preprocess(wide)
    assert array.shape == (SIDE, SIDE, 3) and array.dtype == np.float32
    top = SIDE // 4
    assert (array[:top] == 255).all() and (array[top + SIDE // 2:] == 255).all()
    assert (array[top:top + SIDE // 2] == np.array([30, 20, 10], dtype=np.float32)).all()


def test_existing_captions_kept_replaced_or_added_to(tagger: Path, tmp_path: Path) -> None:
    paths = _images(tmp_path / "images")
    paths[0].with_suffix(".caption").write_text("mine, hand written")
    opts = TagOptions(general_threshold=0.2)
    report = tag_folder(tmp_path / "images", str(tagger), opts, CaptionFiles(".caption"), progress=False)
    assert report.kept == 1 and report.captioned == len(COLOURS) - 1
    assert paths[0].with_suffix(".caption").read_text() == "mine, hand written"
    tag_folder(tmp_path / "images", str(tagger), opts, CaptionFiles(".caption", append=True), progress=False)
    assert paths[0].with_suffix(".caption").read_text() == ", ".join(["mine", "hand written", *_expected(
        COLOURS[0], opts)])
    tag_folder(tmp_path / "images", str(tagger), opts, CaptionFiles(".caption", overwrite=True, separator="|"),
               progress=False)
    assert paths[0].with_suffix(".caption").read_text() == "|".join(_expected(COLOURS[0], opts))
    assert not list((tmp_path / "images").glob(".*.tmp"))  # atomic writes leave nothing behind


def test_bad_inputs_are_named(tagger: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = _images(tmp_path / "images")
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    report = tag_folder(tmp_path / "images", str(tagger), TagOptions(), CaptionFiles(), progress=False)
    assert report.captioned == len(paths) and [u["path"] for u in report.unreadable] == \
        [str(tmp_path / "images" / "broken.png")]
    assert not (tmp_path / "images" / "broken.txt").exists()
    nchw = _export(tmp_path / "nchw", nchw=True)
    with pytest.raises(DistLoraError, match=r"is not a WD14 tagger: its input is \['batch', 3, 32, 32\]"):
        tag_folder(tmp_path / "images", str(nchw), TagOptions(), CaptionFiles(overwrite=True), progress=False)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.onnx").write_bytes((tagger / "model.onnx").read_bytes())
    assert main(["tag", str(tmp_path / "images"), "--model", str(tmp_path / "half")]) == 2
    assert "has no selected_tags.csv" in capsys.readouterr().err
    (tmp_path / "half" / "selected_tags.csv").write_text("id,tag\n1,x\n")
    assert main(["tag", str(tmp_path / "images"), "--model", str(tmp_path / "half")]) == 2
    assert "header must be tag_id,name,category,count" in capsys.readouterr().err
    assert main(["tag", str(tmp_path / "nothing"), "--model", str(tagger)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_with_kohyas_option_names_and_report(tagger: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    _images(tmp_path / "images" / "sub")
    assert main(["tag", str(tmp_path / "images"), "--model", str(tagger), "--recursive", "--general_threshold",
                 "0.3", "--caption_extension", ".tags", "--undesired_tags", "solo,1girl", "--frequency_tags",
                 "--report", str(tmp_path / "report.json")]) == 0
    out = capsys.readouterr().out
    assert f"tagged {len(COLOURS)} images" in out
    report = json.loads((tmp_path / "report.json").read_text())
    captions = [p.read_text() for p in sorted((tmp_path / "images" / "sub").glob("*.tags"))]
    assert len(captions) == len(COLOURS) and not any("solo" in c or "1girl" in c for c in captions)
    assert sum(report["tag_frequency"].values()) == sum(len(c.split(", ")) for c in captions if c)


@pytest.mark.slow
def test_two_processes_write_what_one_does(tagger: Path, tmp_path: Path) -> None:
    _images(tmp_path / "one")
    _images(tmp_path / "two")
    assert main(["tag", str(tmp_path / "one"), "--model", str(tagger), "--general-threshold", "0.2"]) == 0
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / "cpu_2proc.yaml"),
           "--main_process_port", free_port(), "-m", "dist_lora.cli", "tag", str(tmp_path / "two"), "--model",
           str(tagger), "--general-threshold", "0.2", "--report", str(tmp_path / "two.json")]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = {p.name: p.read_text() for p in (tmp_path / "one").glob("*.txt")}
    two = {p.name: p.read_text() for p in (tmp_path / "two").glob("*.txt")}
    assert one == two and len(one) == len(COLOURS)
    assert json.loads((tmp_path / "two.json").read_text())["captioned"] == len(COLOURS)
