"""A small procedural kohya-style dataset: coloured shapes a tiny model can learn in a few steps."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square", "triangle")


def _draw(shape: str, colour: tuple[int, int, int], size: int, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return image


def write_shapes_dataset(root: str | Path, *, trigger: str = "dlsks", images: int = 24, size: int = 160,
                         repeats: int = 2, seed: int = 0) -> Path:
    """``root/<repeats>_<trigger> shapes/NNN.png`` with ``NNN.txt`` captions like ``dlsks, red circle``.

    Images are slightly larger than the training resolution and not square, so resizing and
    cropping (and SDXL's original-size / crop conditioning) are exercised.
    """
    rng = random.Random(seed)
    folder = Path(root) / f"{repeats}_{trigger} shapes"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        shape, colour = SHAPES[i % len(SHAPES)], list(COLOURS)[(i // len(SHAPES)) % len(COLOURS)]
        image = _draw(shape, COLOURS[colour], size, rng)
        if i % 2:  # landscape crop of the square drawing
            image = image.crop((0, size // 8, size, size - size // 8))
        image.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"{trigger}, {colour} {shape}", encoding="utf-8")
    return Path(root)
