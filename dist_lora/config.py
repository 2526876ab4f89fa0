"""Training configuration: loaded from TOML plus dotted overrides into the sections of
``dist_lora.config_sections``, validated, written back, and described in the README's reference.

Validation and the reference are both generated from the fields' ``doc`` and ``metadata``, so they
cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from dist_lora.config_sections import (  # noqa: F401 (re-exported)
    CheckpointConfig,
    Config,
    DataConfig,
    EmaConfig,
    LoggingConfig,
    ModelConfig,
    NetworkConfig,
    OptimizerConfig,
    OutputConfig,
    SampleConfig,
    SchedulerConfig,
    TrainingConfig,
    ValidationConfig,
)
from dist_lora.errors import DistLoraError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


class ConfigError(DistLoraError):
    """A configuration problem, with a message that names the key and what is allowed."""


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _describe_type(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is list:
        return {str: "a list of strings", int: "a list of integers", float: "a list of numbers"}[get_args(tp)[0]]
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]


def _is_a(value: Any, tp: type) -> bool:
    """TOML's types against a field's: bools are not numbers, integers are numbers."""
    if isinstance(value, bool):
        return tp is bool
    return isinstance(value, (int, float)) if tp is float else isinstance(value, tp)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotated type ``tp``; ints are accepted where floats are."""
    origin = get_origin(tp)
    ok: bool
    if origin is Literal:
        ok = value in get_args(tp)
        if not ok:
            hint = _did_you_mean(str(value), [str(a) for a in get_args(tp)])
            raise ConfigError(f"config key '{key}': got {value!r}; expected {_describe_type(tp)}.{hint}")
        return value
    if origin is list:
        item = get_args(tp)[0]
        ok = isinstance(value, list) and all(_is_a(v, item) for v in value)
        value = [float(v) for v in value] if ok and item is float else value
    elif tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    else:  # pragma: no cover - schema error, not user error
        raise TypeError(f"unsupported config type {tp} for {key}")
    if not ok:
        raise ConfigError(f"config key '{key}': got {value!r} ({type(value).__name__}); "
                          f"expected {_describe_type(tp)}.")
    return value


def _check_range(key: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta.get("exclusive_min") and value == lo)):
        relation = ">" if meta.get("exclusive_min") else ">="
        raise ConfigError(f"config key '{key}': got {value!r}; must be {relation} {lo}.")
    if hi is not None and value > hi:
        raise ConfigError(f"config key '{key}': got {value!r}; must be <= {hi}.")


def _section_fields(section_type: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(section_type)}


def _build(raw: dict[str, Any], source: str) -> Config:
    sections = _sections()
    built: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in sections:
            raise ConfigError(f"{source}: unknown config section '{name}'.{_did_you_mean(name, list(sections))} "
                              f"Sections: {', '.join(sections)}.")
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{name}' must be a table of keys, got {value!r}.")
    for name, section_type in sections.items():
        values = raw.get(name, {})
        fields = _section_fields(section_type)
        hints = typing.get_type_hints(section_type)
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            dotted = f"{name}.{key}"
            if key not in fields:
                options = [f"{name}.{k}" for k in fields]
                raise ConfigError(f"{source}: unknown config key '{dotted}'.{_did_you_mean(dotted, options)} "
                                  f"Keys of [{name}]: {', '.join(fields)}.")
            coerced = _coerce(dotted, value, hints[key])
            if not isinstance(coerced, (list, str, bool)):
                _check_range(dotted, coerced, fields[key].metadata)
            kwargs[key] = coerced
        for key, f in fields.items():
            if f.metadata.get("required") and not kwargs.get(key):
                raise ConfigError(f"{source}: required config key '{name}.{key}' is missing: "
                                  f"{f.metadata['doc']}")
        built[name] = section_type(**kwargs)
    return Config(**built)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value``; the value is read as a TOML value, or as a bare string."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value.")
    key, raw_value = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) != 2 or not all(path):
        raise ConfigError(f"override '{text}': the key must be section.key, e.g. training.batch_size=2.")
    try:
        value = tomllib.loads(f"v = {raw_value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw_value.strip()
    return path, value


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a TOML recipe (optional), apply ``section.key=value`` overrides and validate everything."""
    raw: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist (expected a TOML recipe, e.g. "
                              f"configs/tiny_sdxl.toml).")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file '{path}' is not valid TOML: {exc}") from exc
    for text in overrides or []:
        (section, key), value = parse_override(text)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"override '{text}': '{section}' is not a section.")
        raw[section][key] = value
    return _build(raw, source)


def config_from_dict(raw: dict[str, Any]) -> Config:
    return _build(raw, "config")


def to_toml(config: Config) -> str:
    """Serialise a config as TOML (the resolved config written into each run directory)."""
    lines: list[str] = []
    for section, values in config.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def reference_markdown() -> str:
    """The config reference table printed by `dist-lora config-reference` and kept in the README."""
    out = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for section, section_type in _sections().items():
        hints = typing.get_type_hints(section_type)
        for f in dataclasses.fields(section_type):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            shown = "(required)" if f.metadata.get("required") else f"`{toml_value(default)}`"
            type_text = _describe_type(hints[f.name])
            doc = f.metadata["doc"].replace("|", "\\|")  # a bar would end the table cell
            out.append(f"| `{section}.{f.name}` | {type_text} | {shown} | {doc} |")
    return "\n".join(out) + "\n"

