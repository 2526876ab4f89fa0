"""`dist-lora captions`: the edits on caption files, --dry-run, dataset-config subsets, and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from dist_lora.captioning.editor import TagEdit, compile_pattern, edit_tags
from dist_lora.cli import main


def _folder(root: Path, captions: dict[str, str], extension: str = ".txt") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in captions.items():
        Image.new("RGB", (8, 8)).save(root / f"{name}.png")
        (root / f"{name}{extension}").write_text(text)
    return root


def test_edit_order_replace_remove_add_dedupe_trigger() -> None:
    edit = TagEdit(replace=(("1girl", "woman"),), replace_regex=((compile_pattern(r"_", "x"), " "),),
                   remove=frozenset({"solo"}), remove_regex=(compile_pattern(r"\w+ background", "x"),),
                   add=("smiling",), dedupe=True, trigger="ohwx")
    tags = ["solo", "1girl", "white_background", "long_hair", "woman", "ohwx", "long hair"]
    assert edit_tags(tags, edit) == ["ohwx", "woman", "long hair", "smiling"]
    assert edit_tags(["a", "a", "b"], TagEdit(add=("a",))) == ["a", "a", "b"]  # repeats stay without --dedupe


def test_cli_edits_a_folder_and_dry_run_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _folder(tmp_path / "imgs", {"a": "1girl, solo, red_hair", "b": "ohwx, 1girl, smile\n", "c": "cat"})
    (folder / "no_caption.png").write_bytes((folder / "a.png").read_bytes())
    args = ["captions", str(folder), "--remove", "solo", "--replace", "red_hair", "red hair", "--trigger", "ohwx"]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "-1girl, solo, red_hair" in out and "+ohwx, 1girl, red hair" in out
    assert "would change 2 of 3 caption files" in out  # b already reads so
    assert (folder / "a.txt").read_text() == "1girl, solo, red_hair"
    assert main([*args, "--list"]) == 0
    out = capsys.readouterr().out
    assert "changed 2 of 3 caption files" in out and "ohwx: 3" in out and "1girl: 2" in out
    assert (folder / "a.txt").read_text() == "ohwx, 1girl, red hair"
    assert (folder / "b.txt").read_text() == "ohwx, 1girl, smile\n"  # unchanged tags, trailing newline kept
    assert (folder / "c.txt").read_text() == "ohwx, cat"
    assert not (folder / "no_caption.txt").exists()
    assert main([*args]) == 0 and "changed 0 of 3" in capsys.readouterr().out  # idempotent


def test_dataset_config_subsets_with_their_own_extensions(tmp_path: Path) -> None:
    _folder(tmp_path / "a", {"x": "dog, dog, park"}, ".caption")
    _folder(tmp_path / "b", {"y": "dog, beach"}, ".txt")
    (tmp_path / "d.toml").write_text('[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "a"\n'
                                     '  caption_extension = ".caption"\n  [[datasets.subsets]]\n  image_dir = "b"\n')
    assert main(["captions", "--dataset-config", str(tmp_path / "d.toml"), "--dedupe", "--add", "sunny"]) == 0
    assert (tmp_path / "a" / "x.caption").read_text() == "dog, park, sunny"
    assert (tmp_path / "b" / "y.txt").read_text() == "dog, beach, sunny"


def test_bad_input_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _folder(tmp_path / "imgs", {"a": "x"})
    assert main(["captions", str(folder), "--remove-regex", "(unclosed"]) == 2
    assert "--remove-regex '(unclosed' is not a regular expression" in capsys.readouterr().err
    assert main(["captions", str(folder)]) == 2
    assert "nothing to do" in capsys.readouterr().err
    assert main(["captions", str(tmp_path / "missing"), "--dedupe"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert (folder / "a.txt").read_text() == "x"
