"""`dist-lora captions`: the clean-up step between tagging and training, over a folder or a dataset
config's subsets: replace, remove and add tags (exact or by regular expression), drop repeated tags, put the
trigger first, list tag frequencies. ``--dry-run`` prints what would change; writes are atomic."""

from __future__ import annotations

import difflib
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from dist_lora.captioning.files import find_images
from dist_lora.errors import DistLoraError
from dist_lora.utils.files import write_text_atomic


@dataclass(frozen=True)
class TagEdit:
    """Applied in this order: replacements, removals, additions, de-duplication, the trigger first."""

    replace: tuple[tuple[str, str], ...] = ()
    replace_regex: tuple[tuple[re.Pattern[str], str], ...] = ()
    remove: frozenset[str] = frozenset()
    remove_regex: tuple[re.Pattern[str], ...] = ()
    add: tuple[str, ...] = ()
    dedupe: bool = False
    trigger: str = ""

    @property
    def changes_anything(self) -> bool:
        return bool(self.replace or self.replace_regex or self.remove or self.remove_regex or self.add
                    or self.dedupe or self.trigger)


def compile_pattern(pattern: str, option: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise DistLoraError(f"{option} '{pattern}' is not a regular expression: {exc}.") from exc


def edit_tags(tags: list[str], edit: TagEdit) -> list[str]:
    replaced = dict(edit.replace)
    out = []
    for tag in tags:
        tag = replaced.get(tag, tag)
        for pattern, repl in edit.replace_regex:
            tag = pattern.sub(repl, tag).strip()
        if tag and tag not in edit.remove and not any(p.fullmatch(tag) for p in edit.remove_regex):
            out.append(tag)
    out += [t for t in edit.add if t not in out]
    if edit.dedupe:
        out = list(dict.fromkeys(out))
    if edit.trigger:
        out = [edit.trigger] + [t for t in out if t != edit.trigger]
    return out


@dataclass(frozen=True)
class CaptionSet:
    """The caption files edited together: one folder's, with their extension and separator."""

    folder: Path
    extension: str
    recursive: bool = False

    def captions(self) -> list[Path]:
        images = find_images(self.folder, self.recursive)
        return [p.with_suffix(self.extension) for p in images if p.with_suffix(self.extension).is_file()]


def dataset_config_sets(path: str | Path, default_extension: str) -> list[CaptionSet]:
    """A dataset config's image-folder subsets, each with its own caption extension."""
    from dist_lora.data.dataset_config import read_dataset_config

    spec = read_dataset_config(path)
    sets = [CaptionSet(s.image_dir, s.caption_extension or default_extension) for s in spec.subsets
            if s.image_dir is not None and s.metadata_file is None]
    if not sets:
        raise DistLoraError(f"dataset config '{path}' has no image-folder subsets (its captions are in metadata "
                            f"files, which this command does not edit).")
    return sets


@dataclass
class EditReport:
    files: int = 0
    changed: int = 0
    frequency: Counter[str] = field(default_factory=Counter)  # after the edit
    diff: list[str] = field(default_factory=list)


def split_tags(text: str, separator: str) -> list[str]:
    return [t.strip() for line in text.splitlines() for t in line.split(separator.strip() or ",") if t.strip()]


def edit_captions(sets: list[CaptionSet], edit: TagEdit, *, separator: str = ", ", dry_run: bool = False
                  ) -> EditReport:
    """Edit every caption file of ``sets`` (multi-line wildcard captions are edited line by line)."""
    report = EditReport()
    for caption_set in sets:
        for path in caption_set.captions():
            report.files += 1
            old = path.read_text(encoding="utf-8")
            lines = old.splitlines() or [""]
            new_lines = [separator.join(edit_tags(split_tags(line, separator), edit)) for line in lines]
            new = "\n".join(new_lines) + ("\n" if old.endswith("\n") else "")
            for line in new_lines:
                report.frequency.update(split_tags(line, separator))
            if new == old:
                continue
            report.changed += 1
            report.diff += list(difflib.unified_diff(old.splitlines(), new.splitlines(), str(path), str(path),
                                                     lineterm="", n=0))
            if not dry_run:
                write_text_atomic(path, new)
    return report
