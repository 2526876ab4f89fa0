"""A per-sample option that a dataset config's subsets may set: the subset's value (``meta["subset"]``
indexes it), else the training config's default."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Generic, Protocol, TypeVar


class SampleOption(Protocol):
    @property
    def active(self) -> bool: ...


T = TypeVar("T", bound=SampleOption)


@dataclass(frozen=True)
class PerSubset(Generic[T]):
    default: T
    subsets: tuple[T, ...] = ()

    @classmethod
    def build(cls, default: T, subset_options: list[dict[str, Any]]) -> PerSubset[T]:
        """``subset_options``: per subset, the fields its dataset config set; the rest come from ``default``."""
        known = {f.name for f in fields(default)}  # type: ignore[arg-type]
        return cls(default, tuple(replace(default, **{k: v for k, v in options.items() if k in known})  # type: ignore[type-var]
                                  for options in subset_options))

    @property
    def active(self) -> bool:
        return self.default.active or any(option.active for option in self.subsets)

    def for_sample(self, meta: dict[str, Any]) -> T:
        subset = meta.get("subset")
        return self.subsets[subset] if subset is not None and subset < len(self.subsets) else self.default

    def to_json(self) -> dict[str, Any]:
        return {"default": asdict(self.default), "subsets": [asdict(o) for o in self.subsets]}  # type: ignore[call-overload]

    @classmethod
    def from_json(cls, data: dict[str, Any], kind: type[T]) -> PerSubset[T]:
        return cls(kind(**data["default"]), tuple(kind(**o) for o in data["subsets"]))
