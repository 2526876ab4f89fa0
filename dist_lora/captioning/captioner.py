"""Natural-language captions through transformers: BLIP (kohya's ``finetune/make_captions.py``) and
Florence-2 (transformers' own Florence2ForConditionalGeneration), from a local folder or a hub id."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dist_lora.errors import DistLoraError

DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-large"
FLORENCE_DEFAULT_TASK = "<MORE_DETAILED_CAPTION>"
_FAMILIES = {"blip": "BLIP", "florence2": "Florence-2"}


@dataclass(frozen=True)
class CaptionOptions:
    prompt: str = ""  # BLIP: text the caption continues; Florence-2: the task (<CAPTION>, <DETAILED_CAPTION>, ...)
    prefix: str = ""  # put before / after every caption
    suffix: str = ""
    num_beams: int = 1  # kohya's --num_beams (1: greedy)
    max_length: int = 75  # kohya's --max_length: new tokens at most
    min_length: int = 5  # kohya's --min_length (BLIP)
    batch_size: int = 1


def _model_type(model: str) -> str:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise DistLoraError(f"--model '{model}' is not a transformers model folder or a hub id reachable now "
                            f"({str(exc).splitlines()[0]}).") from exc
    kind = str(config.model_type)
    if kind not in _FAMILIES:
        raise DistLoraError(f"--model '{model}' is a '{kind}' model; captioning takes BLIP "
                            f"(e.g. {DEFAULT_CAPTIONER}) or Florence-2 (e.g. florence-community/Florence-2-large).")
    return kind


class Captioner:
    """One captioning model on the best device here (CUDA in fp16, else the CPU in fp32)."""

    def __init__(self, model: str, opts: CaptionOptions) -> None:
        if opts.num_beams < 1 or opts.max_length < 1 or opts.min_length < 0 or opts.min_length > opts.max_length:
            raise DistLoraError(f"--num-beams {opts.num_beams}, --max-length {opts.max_length}, --min-length "
                                f"{opts.min_length}: beams and length must be at least 1, min at most max.")
        self.kind = _model_type(model)
        self.opts = opts
        # One GPU per process under a launcher: its local rank's.
        self.device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        from transformers import AutoProcessor, BlipForConditionalGeneration, Florence2ForConditionalGeneration

        model_class: Any = BlipForConditionalGeneration if self.kind == "blip" else Florence2ForConditionalGeneration
        self.processor = AutoProcessor.from_pretrained(model)
        self.model = model_class.from_pretrained(model, dtype=dtype).to(self.device).eval()
        self.task = opts.prompt or FLORENCE_DEFAULT_TASK
        if self.kind == "florence2" and not (self.task.startswith("<") and self.task.endswith(">")):
            raise DistLoraError(f"--prompt '{opts.prompt}': a Florence-2 prompt is one of its tasks, e.g. <CAPTION>, "
                                f"<DETAILED_CAPTION> or {FLORENCE_DEFAULT_TASK}.")

    @torch.no_grad()
    def captions(self, images: list[Image.Image]) -> list[str]:
        opts = self.opts
        if self.kind == "blip":
            text = [opts.prompt] * len(images) if opts.prompt else None
            inputs = self.processor(images=images, text=text, return_tensors="pt").to(self.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            out = self.model.generate(**inputs, num_beams=opts.num_beams, max_length=opts.max_length,
                                      min_length=opts.min_length)
        else:
            inputs = self.processor(text=[self.task] * len(images), images=images, return_tensors="pt").to(self.device)
            out = self.model.generate(input_ids=inputs["input_ids"],
                                      pixel_values=inputs["pixel_values"].to(self.model.dtype),
                                      num_beams=opts.num_beams, max_new_tokens=opts.max_length)
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [f"{opts.prefix}{' '.join(t.split())}{opts.suffix}" for t in texts]


def caption_folder(src: str | Path, model: str, opts: CaptionOptions, files: Any, *, recursive: bool = False,
                   progress: bool = True) -> Any:
    """`dist-lora caption`: each image that needs a caption (see CaptionFiles) described in one sentence or
    paragraph, each process its share."""
    from dist_lora.captioning.files import find_images
    from dist_lora.captioning.per_rank import caption_images

    images = find_images(src, recursive)  # inputs checked before the model loads
    captioner = Captioner(model, opts)
    return caption_images(images, files, lambda batch: [[c] for c in captioner.captions(batch)],
                          batch_size=opts.batch_size, progress=progress, what="captioning", count_tags=False)
