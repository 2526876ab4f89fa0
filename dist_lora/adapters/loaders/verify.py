"""`dist-lora verify`: for any adapter file, what each UI's loader takes, leaves out and computes differently."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_lora.adapters.loaders import a1111, comfyui, diffusers_loader, sd_scripts
from dist_lora.adapters.loaders.layouts import ParsedFile, parse_adapter_file
from dist_lora.adapters.loaders.names import FamilyNames
from dist_lora.adapters.loaders.report import UI_NAMES, UIS, UiReport
from dist_lora.errors import DistLoraError

RESOLVERS: dict[str, Callable[[ParsedFile, FamilyNames], UiReport]] = {
    "a1111": a1111.resolve, "comfyui": comfyui.resolve, "diffusers": diffusers_loader.resolve,
    "kohya": sd_scripts.resolve}
_FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


@dataclass
class Verification:
    parsed: ParsedFile
    reports: list[UiReport]
    mismatched: list[str]  # modules whose tensors do not fit the module they name

    @property
    def ok(self) -> bool:
        return not self.mismatched and all(r.ok for r in self.reports)

    def layouts(self) -> Counter[str]:
        return Counter(m.layout for m in self.parsed.modules.values())

    def to_json(self) -> dict[str, Any]:
        return {"file": str(self.parsed.path), "family": self.parsed.family,
                "family_from": self.parsed.family_source, "keys": len(self.parsed.shapes),
                "modules": len(self.parsed.modules), "layouts": dict(self.layouts()), "ok": self.ok,
                "mismatched": self.mismatched, "loaders": {r.ui: r.to_json() for r in self.reports}}


def parse_uis(value: str) -> list[str]:
    uis = list(UIS) if value == "all" else [v.strip() for v in value.split(",") if v.strip()]
    unknown = [u for u in uis if u not in UIS]
    if unknown or not uis:
        raise DistLoraError(f"--ui '{value}': expected 'all' or a comma-separated list of {', '.join(UIS)}.")
    return uis


def _mismatches(parsed: ParsedFile, names: FamilyNames) -> list[str]:
    """LoRA modules whose up/down tensors do not have the named module's output/input width."""
    problems = []
    for module in parsed.modules.values():
        if module.target is None or not {"lora_up.weight", "lora_down.weight"} <= set(module.parts):
            continue
        info = names.modules[module.target]
        up = parsed.shapes[module.parts["lora_up.weight"]]
        down = parsed.shapes[module.parts["lora_down.weight"]]
        if up[0] != info.shape[0] or down[1] != info.shape[1]:
            problems.append(f"{module.spelled}: up {up} / down {down} do not fit {info.label} of weight "
                            f"{info.shape} (a file for another model?)")
    return problems


def verify_file(path: str | Path, uis: Sequence[str] = UIS, family: str | None = None,
                base: str | None = None) -> Verification:
    parsed = parse_adapter_file(path, family, base)
    names = parsed.names
    return Verification(parsed, [RESOLVERS[ui](parsed, names) for ui in uis], _mismatches(parsed, names))


def _reasons(ignored: dict[str, str], verbose: bool) -> list[str]:
    by_reason: dict[str, list[str]] = defaultdict(list)
    for key, reason in ignored.items():
        # One line per kind of reason: the names each key's reason quotes are the key's own.
        by_reason[re.sub(r"'[^']*'", "'...'", reason)].append(key)
    lines = []
    for reason, keys in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        shown = keys if verbose else keys[:3]
        more = f" (+{len(keys) - len(shown)} more)" if len(keys) > len(shown) else ""
        lines.append(f"      {len(keys)} keys: {reason}")
        lines.extend(f"        {k}" for k in shown)
        if more:
            lines.append(f"        ...{more}")
    return lines


def format_verification(result: Verification, verbose: bool = False) -> str:
    parsed = result.parsed
    layouts = ", ".join(f"{name}: {count}" for name, count in result.layouts().most_common())
    lines = [f"{parsed.path}: {len(parsed.shapes)} keys, {len(parsed.modules)} modules",
             f"  base model: {_FAMILY_NAMES[parsed.family]} (from {parsed.family_source})",
             f"  layout:     {layouts or 'none recognised'}"]
    if parsed.unknown:
        lines.append(f"  {len(parsed.unknown)} keys of no known layout, e.g. {parsed.unknown[:3]}")
    lines.extend(f"  does not fit: {m}" for m in result.mismatched[: None if verbose else 5])
    for report in result.reports:
        status = "refuses the file" if report.refused else ("loads every key" if report.ok else
                                                            f"leaves out {len(report.ignored)} keys")
        lines.append(f"  {UI_NAMES[report.ui]}: {status}; {len(report.loaded)} keys -> "
                     f"{len(report.modules())} modules")
        if report.refused:
            lines.append(f"      {report.refused}")
        lines.extend(_reasons(report.ignored, verbose))
        lines.extend(f"      note: {note}" for note in report.notes)
    rotations = sum(1 for m in parsed.modules.values() if "oft_blocks" in m.parts)
    if rotations:
        lines.append(f"  {rotations} modules are OFT/BOFT: no layout gets them into diffusers (peft's OFT rotates a "
                     f"layer's input, these files its output), nor BOFT into AUTOMATIC1111 v1.10; --fix cannot "
                     f"change that (bake them into the model with `dist-lora merge`).")
    elif not result.ok:
        lines.append("  `dist-lora verify FILE --fix OUT` writes the kohya layout every loader above reads.")
    return "\n".join(lines)
