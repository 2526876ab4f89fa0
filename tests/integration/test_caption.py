"""`dist-lora caption` with tiny BLIP and Florence-2 models built here from their transformers configs
(random weights, real processors): the files hold what the model generates for each image, with the
prefix, suffix and write rules; two processes write what one does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dist_lora.captioning.captioner import CaptionOptions, caption_folder
from dist_lora.captioning.files import CaptionFiles
from dist_lora.cli import main
from dist_lora.errors import DistLoraError
from tests.integration.distributed_helpers import REPO, free_port

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "on", "the", "grass", "sitting", "big", "small"]


def _blip(out: Path) -> Path:
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    out.mkdir(parents=True)
    (out / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=BertTokenizer(str(out / "vocab.txt")))
    text = {"vocab_size": len(WORDS) + 5, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 32, "encoder_hidden_size": 16, "bos_token_id": 2, "sep_token_id": 3,
            "pad_token_id": 0}
    vision = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
              "image_size": 32, "patch_size": 8}
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _florence(out: Path) -> Path:
    from transformers import (
        BartTokenizer,
        CLIPImageProcessorPil,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    out.mkdir(parents=True)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for c in "abcdefghijklmnopqrstuvwxyz.?":
        vocab[c] = len(vocab)
        vocab["Ġ" + c] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = BartTokenizer(str(out / "vocab.json"), str(out / "merges.txt"),
                              extra_special_tokens={"image_token": "<image>"})
    side = 64  # DaViT's strides (4, 2, 2, 2): a 2 x 2 grid of image tokens, plus the pooled one
    images = CLIPImageProcessorPil(size={"height": side, "width": side}, do_center_crop=False,
                                   image_seq_length=(side // 32) ** 2 + 1)
    text = {"vocab_size": len(tokenizer), "d_model": 16, "encoder_layers": 1, "decoder_layers": 1,
            "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32,
            "max_position_embeddings": 128}
    vision = {"depths": [1, 1, 1, 1], "embed_dim": [8, 16, 16, 16], "num_heads": [1, 2, 2, 2],
              "num_groups": [1, 2, 2, 2], "window_size": 2, "projection_dim": 16}
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(Florence2Config(text_config=text, vision_config=vision,
                                                              image_token_id=tokenizer.image_token_id))
    model.save_pretrained(out)
    Florence2Processor(image_processor=images, tokenizer=tokenizer).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def captioners(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("captioners")
    return {"blip": _blip(root / "blip"), "florence2": _florence(root / "florence2")}


def _images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, colour in enumerate([(230, 20, 20), (20, 30, 220), (240, 240, 240), (10, 120, 40)]):
        image = Image.new("RGB", (48 + 8 * i, 40), colour)
        image.paste((255 - colour[0], 90, 30), (5, 5, 25, 25))
        path = folder / f"img{i}.png"
        image.save(path)
        paths.append(path)
    return paths


@torch.no_grad()
def _direct(kind: str, model_dir: Path, image: Image.Image, prompt: str, beams: int, max_length: int) -> str:
    """What the model generates for the image through transformers alone."""
    from transformers import AutoProcessor, BlipForConditionalGeneration, Florence2ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    if kind == "blip":
        model = BlipForConditionalGeneration.from_pretrained(model_dir).eval()
        inputs = processor(images=[image], text=[prompt] if prompt else None, return_tensors="pt")
        out = model.generate(**inputs, num_beams=beams, max_length=max_length, min_length=5)
    else:
        model = Florence2ForConditionalGeneration.from_pretrained(model_dir).eval()
        inputs = processor(text=[prompt or "<MORE_DETAILED_CAPTION>"], images=[image], return_tensors="pt")
        out = model.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], num_beams=beams,
                             max_new_tokens=max_length)
    assert out.shape[1] <= max_length + (inputs["input_ids"].shape[1] if kind == "blip" and prompt else 1) + 1
    return " ".join(processor.batch_decode(out, skip_special_tokens=True)[0].split())


@pytest.mark.parametrize(("kind", "prompt"), [("blip", ""), ("blip", "a photo of"), ("florence2", "<CAPTION>")])
def test_captions_are_what_the_model_generates(kind: str, prompt: str, captioners: dict[str, Path],
                                               tmp_path: Path) -> None:
    paths = _images(tmp_path / "images")
    opts = CaptionOptions(prompt=prompt, prefix="ohwx, ", suffix=".", num_beams=2, max_length=12, batch_size=3)
    report = caption_folder(tmp_path / "images", str(captioners[kind]), opts, CaptionFiles(".caption"),
                            progress=False)
    assert report.captioned == len(paths) and not report.unreadable
    for path in paths:
        expected = _direct(kind, captioners[kind], Image.open(path).convert("RGB"), prompt, 2, 12)
        assert expected, "the tiny model generated nothing; the comparison would be vacuous"
        assert path.with_suffix(".caption").read_text() == f"ohwx, {expected}."


def test_write_rules_and_errors(captioners: dict[str, Path], tiny_models: dict[str, Path], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    paths = _images(tmp_path / "images")
    paths[0].with_suffix(".caption").write_text("my own caption")
    (tmp_path / "images" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    assert main(["caption", str(tmp_path / "images"), "--model", str(captioners["blip"]), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"captioned {len(paths) - 1} images of {len(paths) + 1} (1 already captioned, kept; 1 unreadable" in out
    assert "broken.jpg" in out and paths[0].with_suffix(".caption").read_text() == "my own caption"
    assert main(["caption", str(tmp_path / "images"), "--model", str(captioners["blip"]), "--overwrite",
                 "--no-progress"]) == 0
    assert paths[0].with_suffix(".caption").read_text() != "my own caption"
    capsys.readouterr()
    assert main(["caption", str(tmp_path / "images"), "--model", str(tiny_models["sd15"] / "text_encoder")]) == 2
    assert "captioning takes BLIP" in capsys.readouterr().err
    assert main(["caption", str(tmp_path / "images"), "--model", str(tmp_path / "images")]) == 2
    assert "is not a transformers model folder" in capsys.readouterr().err
    with pytest.raises(DistLoraError, match="a Florence-2 prompt is one of its tasks"):
        caption_folder(tmp_path / "images", str(captioners["florence2"]), CaptionOptions(prompt="describe it"),
                       CaptionFiles(".caption", overwrite=True), progress=False)


@pytest.mark.slow
def test_two_processes_write_what_one_does(captioners: dict[str, Path], tmp_path: Path) -> None:
    _images(tmp_path / "one")
    _images(tmp_path / "two")
    model = str(captioners["blip"])
    assert main(["caption", str(tmp_path / "one"), "--model", model, "--num-beams", "2", "--no-progress"]) == 0
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / "cpu_2proc.yaml"),
           "--main_process_port", free_port(), "-m", "dist_lora.cli", "caption", str(tmp_path / "two"), "--model",
           model, "--num-beams", "2", "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = {p.name: p.read_text() for p in (tmp_path / "one").glob("*.caption")}
    two = {p.name: p.read_text() for p in (tmp_path / "two").glob("*.caption")}
    assert one == two and len(one) == 4
