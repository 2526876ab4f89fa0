"""Sample prompts: inline in the config or from a file in kohya's formats, resolved against the
``[sample]`` defaults and checked before any model loads.

A prompt line is ``PROMPT --n NEGATIVE --w WIDTH --h HEIGHT --d SEED --l CFG --s STEPS --ss SAMPLER``
(any subset of the options, in any order), as kohya's sd-scripts reads it. Tables (``.toml`` subsets,
``.json`` objects) use kohya's keys: prompt, negative_prompt, width, height, seed, scale, sample_steps,
sample_sampler (cfg_scale, steps and sampler are accepted too).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_lora.config import SampleConfig
from dist_lora.errors import DistLoraError
from dist_lora.sampling.samplers import UnknownSampler, find_sampler

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


class PromptError(DistLoraError):
    """A sample prompt that cannot be used; the message names the file (or config key) and line."""


@dataclass(frozen=True)
class SamplePrompt:
    number: int  # position among all prompts, from 0 (names the image files)
    prompt: str
    negative_prompt: str
    width: int
    height: int
    seed: int
    cfg_scale: float
    steps: int
    sampler: str  # canonical sampler name
    origin: str  # where it was written, for messages


_LINE_OPTIONS = {"n": "negative_prompt", "w": "width", "h": "height", "d": "seed", "l": "cfg_scale", "s": "steps",
                 "ss": "sampler"}
_TABLE_KEYS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
               "seed": "seed", "scale": "cfg_scale", "cfg_scale": "cfg_scale", "sample_steps": "steps",
               "steps": "steps", "sample_sampler": "sampler", "sampler": "sampler"}
_TYPES: dict[str, type] = {"prompt": str, "negative_prompt": str, "width": int, "height": int, "seed": int,
                           "cfg_scale": float, "steps": int, "sampler": str}


def _typed(name: str, value: Any, origin: str, spelled: str) -> Any:
    kind = _TYPES[name]
    if kind is str:
        if isinstance(value, str):
            return value.strip()
    elif not isinstance(value, bool):
        if kind is int and isinstance(value, int):
            return value
        if kind is int and isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
            return int(value)
        if kind is float:
            try:
                return float(value)
            except (TypeError, ValueError):
                pass
    expected = {str: "text", int: "a whole number", float: "a number"}[kind]
    raise PromptError(f"{origin}: {spelled} {value!r} is not {expected}.")


def parse_line(line: str, origin: str) -> dict[str, Any]:
    """One prompt line in kohya's format -> the values it sets."""
    parts = line.split(" --")
    values: dict[str, Any] = {"prompt": parts[0].strip()}
    if not values["prompt"]:
        raise PromptError(f"{origin}: the line has no prompt before its options: {line.strip()!r}.")
    for part in parts[1:]:
        flag, _, value = part.strip().partition(" ")
        name = _LINE_OPTIONS.get(flag.lower())
        if name is None:
            known = ", ".join(f"--{f}" for f in _LINE_OPTIONS)
            raise PromptError(f"{origin}: unknown option '--{flag}'; known options: {known}.")
        if not value.strip():
            raise PromptError(f"{origin}: option '--{flag}' has no value.")
        values[name] = _typed(name, value, origin, f"--{flag}")
    return values


def parse_table(table: dict[str, Any], origin: str) -> dict[str, Any]:
    """One prompt table (a .toml subset or a .json object) -> the values it sets."""
    values: dict[str, Any] = {}
    for key, value in table.items():
        name = _TABLE_KEYS.get(key)
        if name is None:
            raise PromptError(f"{origin}: unknown key '{key}'; known keys: {', '.join(_TABLE_KEYS)}.")
        values[name] = _typed(name, value, origin, f"'{key}'")
    if not values.get("prompt"):
        raise PromptError(f"{origin}: no 'prompt'.")
    return values


def _read_file(path: Path) -> list[tuple[dict[str, Any], str]]:
    if not path.is_file():
        raise PromptError(f"sample.prompt_file '{path}' does not exist.")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [(parse_line(line, f"{path}:{number}"), f"{path}:{number}")
                for number, line in enumerate(text.splitlines(), start=1)
                if line.strip() and not line.lstrip().startswith("#")]
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PromptError(f"'{path}' is not valid TOML: {exc}") from exc
        table = data.get("prompt")
        if not isinstance(table, dict) or not isinstance(table.get("subset"), list):
            raise PromptError(f"'{path}' needs a [prompt] table with [[prompt.subset]] entries (kohya's layout).")
        defaults = {k: v for k, v in table.items() if k != "subset"}
        return [(parse_table({**defaults, **subset}, f"{path}: [[prompt.subset]] #{i}"),
                 f"{path}: [[prompt.subset]] #{i}") for i, subset in enumerate(table["subset"], start=1)]
    if suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PromptError(f"'{path}' is not valid JSON: {exc}") from exc
        if not isinstance(items, list):
            raise PromptError(f"'{path}' must hold a list of prompt lines or objects.")
        entries = []
        for i, item in enumerate(items, start=1):
            origin = f"{path}: item {i}"
            if isinstance(item, str):
                entries.append((parse_line(item, origin), origin))
            elif isinstance(item, dict):
                entries.append((parse_table(item, origin), origin))
            else:
                raise PromptError(f"{origin}: expected a prompt line or an object, got {item!r}.")
        return entries
    raise PromptError(f"sample.prompt_file '{path}': expected a .txt, .toml or .json file.")


def load_prompts(cfg: SampleConfig, resolution: int, training_seed: int) -> list[SamplePrompt]:
    """Every sample prompt, resolved against the defaults and checked; [] when none are configured."""
    entries = [(parse_line(line, f"sample.prompts[{i}]"), f"sample.prompts[{i}]") for i, line in
               enumerate(cfg.prompts)]
    if cfg.prompt_file:
        entries += _read_file(Path(cfg.prompt_file))
    prompts = []
    for number, (values, origin) in enumerate(entries):
        seed = values.get("seed", cfg.seed)
        resolved = SamplePrompt(
            number=number, prompt=values["prompt"], negative_prompt=values.get("negative_prompt", cfg.negative_prompt),
            width=values.get("width", cfg.width or resolution), height=values.get("height", cfg.height or resolution),
            seed=training_seed + number if seed == -1 else seed, cfg_scale=values.get("cfg_scale", cfg.cfg_scale),
            steps=values.get("steps", cfg.steps), sampler=values.get("sampler", cfg.sampler), origin=origin)
        prompts.append(_checked(resolved))
    return prompts


def _checked(p: SamplePrompt) -> SamplePrompt:
    for name, size in (("width", p.width), ("height", p.height)):
        if size < 64 or size % 8:
            raise PromptError(f"{p.origin}: {name} {size} must be a multiple of 8 of at least 64 (the VAE "
                              f"downsamples by 8).")
    if not 1 <= p.steps <= 1000:
        raise PromptError(f"{p.origin}: steps {p.steps} must be between 1 and 1000.")
    if p.cfg_scale < 0:
        raise PromptError(f"{p.origin}: CFG scale {p.cfg_scale} must be >= 0.")
    if p.seed < 0:
        raise PromptError(f"{p.origin}: seed {p.seed} must be >= 0.")
    try:
        sampler = find_sampler(p.sampler)
    except UnknownSampler as exc:
        raise PromptError(f"{p.origin}: {exc}") from None
    return SamplePrompt(p.number, p.prompt, p.negative_prompt, p.width, p.height, p.seed, p.cfg_scale, p.steps,
                        sampler.name, p.origin)
