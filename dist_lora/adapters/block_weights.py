"""Per-block weights in the notation of the LoRA Block Weight extension, as kohya's svd_merge_lora.py
(``--lbws``) reads it: a list of 17, 12, 20 or 26 numbers, the first (BASE) for the text encoders, the
rest for the UNet blocks a list of that length names. SD 1.x/2.x take 17 or 26, SDXL 12 or 20.

The 26 slots are BASE, IN00-IN11, MID, OUT00-OUT11; the shorter lists give the slots their flags mark,
in order, and every other slot keeps weight 1.
"""

from __future__ import annotations

import json
import re

from dist_lora.errors import DistLoraError

SLOTS = ["BASE", *(f"IN{i:02d}" for i in range(12)), "MID", *(f"OUT{i:02d}" for i in range(12))]
# Which of the 26 slots each list length names (kohya's LAYER17/LAYER12/LAYER20/LAYER26).
_NAMED = {
    17: {"BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", *(f"OUT{i:02d}" for i in range(3, 12))},
    12: {"BASE", "IN04", "IN05", "IN07", "IN08", "MID", *(f"OUT{i:02d}" for i in range(6))},
    20: {"BASE", *(f"IN{i:02d}" for i in range(9)), "MID", *(f"OUT{i:02d}" for i in range(9))},
    26: set(SLOTS),
}
LENGTHS = {"sd1": (17, 26), "sdxl": (12, 20)}
_SD_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


def slot_of(key: str, family: str) -> int:
    """The slot (index into SLOTS) of a kohya module key; -1 for modules no slot covers (which keep 1)."""
    if "text_model_encoder_" in key:
        return 0
    if family != "sdxl":
        match = _SD_UPDOWN.search(key)
        if match:
            side, block, kind, index = match[1], int(match[2]), match[3], int(match[4])
            if side == "down":
                offset = 3 * block + index + 1 if kind in ("resnets", "attentions") else 3 * (block + 1)
                return 1 + offset
            offset = 3 * block + index if kind in ("resnets", "attentions") else 3 * block + 2
            return 14 + offset
        return 13 if "mid_block_" in key else -1
    name = key.removeprefix("lora_unet_")
    if not key.startswith("lora_unet_"):
        return -1
    if name.startswith(("time_embed_", "label_emb_")):
        return 1
    if name.startswith("input_blocks_"):
        return 1 + int(name.split("_")[2])
    if name.startswith("middle_block_"):
        return 13
    if name.startswith("output_blocks_"):
        return 14 + int(name.split("_")[2])
    return 23 if name.startswith("out_") else -1


def parse_block_weights(text: str, family: str, where: str) -> list[float]:
    """A list (JSON, or numbers separated by commas) -> the weight of each of the 26 slots."""
    try:
        values = json.loads(text if text.strip().startswith("[") else f"[{text}]")
        ok = isinstance(values, list) and all(isinstance(v, (int, float)) for v in values)
    except json.JSONDecodeError:
        ok = False
    if not ok:
        raise DistLoraError(f"{where} = {text!r} is not a list of numbers, e.g. "
                            f"[1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1] (17 for SD 1.x/2.x, 12 or 20 for SDXL).")
    allowed = LENGTHS["sdxl" if family == "sdxl" else "sd1"]
    if len(values) not in allowed:
        raise DistLoraError(f"{where} has {len(values)} weights; for {family} give "
                            f"{' or '.join(map(str, allowed))} (BASE first, then the UNet blocks).")
    weights = [1.0] * len(SLOTS)
    named = [i for i, slot in enumerate(SLOTS) if slot in _NAMED[len(values)]]
    for index, value in zip(named, values, strict=True):
        weights[index] = float(value)
    return weights


def block_weight(key: str, family: str, weights: list[float] | None) -> float:
    if weights is None:
        return 1.0
    slot = slot_of(key, family)
    return weights[slot] if slot >= 0 else 1.0
