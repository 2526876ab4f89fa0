"""What one loader does with a file: the module each key changes, the keys it ignores and why, and what
it computes differently from the trainer that wrote it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dist_lora.adapters.loaders.layouts import ParsedFile
from dist_lora.adapters.loaders.names import COMPONENTS, Target

UIS = ("a1111", "comfyui", "diffusers", "kohya")
UI_NAMES = {"a1111": "AUTOMATIC1111 / Forge (built-in Lora)", "comfyui": "ComfyUI (LoraLoader)",
            "diffusers": "diffusers (load_lora_weights)", "kohya": "kohya sd-scripts (networks.lora / lycoris.kohya)"}


def label(target: Target) -> str:
    return f"{COMPONENTS[target[0]]}.{target[1]}"


@dataclass
class UiReport:
    ui: str
    loaded: dict[str, str] = field(default_factory=dict)  # file key -> the module it changes
    ignored: dict[str, str] = field(default_factory=dict)  # file key -> why the loader leaves it out
    refused: str | None = None  # the loader refuses the whole file
    notes: list[str] = field(default_factory=list)  # conventions it applies differently

    @property
    def ok(self) -> bool:
        return self.refused is None and not self.ignored

    def modules(self) -> set[str]:
        return set(self.loaded.values())

    def to_json(self) -> dict[str, Any]:
        return {"ui": self.ui, "ok": self.ok, "refused": self.refused, "loaded_keys": len(self.loaded),
                "modules": len(self.modules()), "ignored": dict(sorted(self.ignored.items())),
                "loaded": dict(sorted(self.loaded.items())), "notes": self.notes}


def dora_notes(parsed: ParsedFile, ui: str) -> list[str]:
    """DoRA magnitudes are applied by three conventions (see dist_lora.adapters.dora_axis)."""
    per_row = per_column = 0
    for module in parsed.modules.values():
        key = module.parts.get("dora_scale")
        if key is None:
            continue
        shape = parsed.shapes[key]
        if module.layout in ("diffusers/peft", "peft save_pretrained"):
            per_row += 1  # peft's magnitudes are per row ([1, out, 1, 1] for a Conv2d)
        elif len(shape) >= 2 and shape[0] == 1 and shape[1] > 1:
            per_column += 1
        else:
            per_row += 1
    notes = []
    if per_row and ui == "a1111":
        notes.append(f"{per_row} DoRA modules keep one magnitude per output row (peft / LyCORIS wd_on_out); "
                     f"AUTOMATIC1111 normalises per input column, so it applies them differently from how they "
                     f"were trained")
    if per_row and ui == "comfyui":
        notes.append(f"{per_row} DoRA modules keep one magnitude per output row; ComfyUI divides by the norm of "
                     f"the base weight instead of the adapted one, so it applies them differently from how they "
                     f"were trained")
    if per_column and ui == "kohya":
        notes.append(f"{per_column} DoRA modules keep one magnitude per input column: lycoris.kohya reads them "
                     f"(wd_on_output=False); networks.lora has no DoRA")
    return notes
