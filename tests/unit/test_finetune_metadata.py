"""sd-scripts' fine-tuning subsets (metadata_file): the images a metadata file lists, with its captions and
tags, beside image-folder subsets in one manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from dist_lora.cli import main
from dist_lora.data.dataset_config import DatasetConfigError, read_dataset_config
from dist_lora.data.kohya import DatasetFolderError
from dist_lora.data.manifest import Manifest
from dist_lora.data.prepare import PrepareOptions, prepare_dataset
from dist_lora.importers.kohya_dataset import import_dataset_config
from dist_lora.importers.kohya_import import import_kohya_config
from tests.conftest import shard_members

CONFIG = """
[general]
resolution = 64
enable_bucket = false
caption_extension = ".txt"

[[datasets]]
  [[datasets.subsets]]
  metadata_file = "meta_cap_dd.json"
  image_dir = "ft"
  num_repeats = 2
  caption_prefix = "photo,"
  shuffle_caption = true

  [[datasets.subsets]]
  metadata_file = "more.jsonl"

[[datasets]]
  [[datasets.subsets]]
  image_dir = "db"
  class_tokens = "zkw"
"""


def _dataset(root: Path, config: str = CONFIG) -> Path:
    for folder, names in (("ft", ["a.png", "b.jpg", "c.webp", "sub/d.png"]), ("elsewhere", ["e.png"]),
                          ("db", ["0.png"])):
        for name in names:
            (root / folder / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (64, 64), (len(name) * 30, 20, 30)).save(root / folder / name)
    # What sd-scripts' finetune scripts write: keys without extension, tags merged in, bucket sizes added.
    (root / "meta_cap_dd.json").write_text(json.dumps({
        "a": {"caption": "a red  cube", "tags": "red, cube", "train_resolution": [64, 64]},
        "b": {"caption": "a blue ball"},
        "c": {"tags": "green"},
        "sub/d.png": {},
    }))
    (root / "more.jsonl").write_text(
        json.dumps({"image_path": str(root / "elsewhere" / "e"), "caption": "far away", "image_size": [64, 64]})
        + "\n\n")
    path = root / "dataset.toml"
    path.write_text(config)
    return path


def test_metadata_subsets_beside_an_image_folder(tmp_path: Path) -> None:
    spec = read_dataset_config(_dataset(tmp_path))
    report = prepare_dataset(None, tmp_path / "out", PrepareOptions(), spec)
    assert (report.found, report.accepted) == (6, 6)
    samples = shard_members(tmp_path / "out")
    captions = {key: members["txt"].decode() for key, members in samples.items()}
    # sd-scripts' FineTuningDataset: caption, then the tags after ',' (its caption_separator); the prefix first.
    assert captions == {
        "00_meta_cap_dd/a": "photo, a red cube,red, cube",
        "00_meta_cap_dd/b": "photo, a blue ball",
        "00_meta_cap_dd/c": "photo, green",
        "00_meta_cap_dd/sub/d": "photo,",
        "01_more/" + (tmp_path / "elsewhere" / "e").as_posix().lstrip("/"): "far away",
        "02_db/0": "zkw",  # the image-folder subset keeps its own rules (class tokens, caption_extension)
    }
    manifest = Manifest.read(tmp_path / "out")
    assert manifest.raw["num_samples_with_repeats"] == 4 * 2 + 1 + 1
    assert manifest.subsets[0]["metadata_file"] == str(tmp_path / "meta_cap_dd.json")
    assert manifest.subset_options("captions")[0] == {"shuffle": True}
    sources = json.loads((tmp_path / "out" / "sources.json").read_text())["sources"]
    assert sorted(sources) == sorted(f"{k.rsplit('/', 1)[0]}/{Path(v).name}" for k, v in (
        ("00_meta_cap_dd/a", "a.png"), ("00_meta_cap_dd/b", "b.jpg"), ("00_meta_cap_dd/c", "c.webp"),
        ("00_meta_cap_dd/sub/d", "d.png"), ("01_more/" + (tmp_path / "elsewhere").as_posix().lstrip("/") + "/e",
                                            "e.png"), ("02_db/0", "0.png")))


def test_a_changed_caption_in_the_metadata_is_taken_on_the_next_prepare(tmp_path: Path) -> None:
    spec = read_dataset_config(_dataset(tmp_path))
    prepare_dataset(None, tmp_path / "out", PrepareOptions(), spec)
    meta = json.loads((tmp_path / "meta_cap_dd.json").read_text())
    meta["b"]["caption"] = "a yellow ball"
    (tmp_path / "meta_cap_dd.json").write_text(json.dumps(meta))
    prepare_dataset(None, tmp_path / "out", PrepareOptions(), read_dataset_config(tmp_path / "dataset.toml"))
    assert shard_members(tmp_path / "out")["00_meta_cap_dd/b"]["txt"] == b"photo, a yellow ball"


@pytest.mark.parametrize(("change", "message"), [
    (('  metadata_file = "more.jsonl"', '  metadata_file = "more.jsonl"\n  class_tokens = "x"'),
     "datasets[0].subsets[1].class_tokens is set, but datasets[0].subsets[1] is a fine-tuning subset"),
    (('  metadata_file = "more.jsonl"', '  image_dir = "db"'),
     "datasets[0] mixes subsets with metadata_file (fine-tuning) and without"),
    (('metadata_file = "more.jsonl"', 'metadata_file = "none.jsonl"'),
     "datasets[0].subsets[1].metadata_file = "),
    (('  image_dir = "ft"\n', ''), "names image 'a' by a relative path; set the subset's image_dir"),
])
def test_bad_fine_tuning_configs_name_the_key_and_write_nothing(tmp_path: Path, change: tuple[str, str],
                                                                message: str) -> None:
    assert change[0] in CONFIG
    path = _dataset(tmp_path, CONFIG.replace(*change, 1))
    with pytest.raises((DatasetConfigError, DatasetFolderError)) as caught:
        prepare_dataset(None, tmp_path / "out", PrepareOptions(), read_dataset_config(path))
    assert message in str(caught.value), caught.value
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("metadata", "message"), [
    ('{"a": {"caption": "x"}, "zz": {}}', "lists image 'zz', but neither"),
    ('{"a": {"caption": "x"', "not valid JSON"),
    ('["a"]', "holds a JSON list"),
    ('{"a": "a red cube"}', "entry 'a' is a str"),
    ('{"a": {"tags": ["red"]}}', "entry 'a' has tags = ['red']; expected a string"),
    ("{}", "lists no images"),
])
def test_bad_metadata_names_the_file_and_entry(tmp_path: Path, metadata: str, message: str) -> None:
    path = _dataset(tmp_path)
    (tmp_path / "meta_cap_dd.json").write_text(metadata)
    with pytest.raises(DatasetFolderError) as caught:
        prepare_dataset(None, tmp_path / "out", PrepareOptions(), read_dataset_config(path))
    assert message in str(caught.value) and str(tmp_path / "meta_cap_dd.json") in str(caught.value), caught.value
    assert not (tmp_path / "out").exists()


def test_bad_jsonl_line_is_named(tmp_path: Path) -> None:
    path = _dataset(tmp_path)
    (tmp_path / "more.jsonl").write_text('{"image_path": "/x.png"}\n{"caption": "no path"}\n')
    with pytest.raises(DatasetFolderError, match=r"more\.jsonl', line 2: expected an object with \"image_path\""):
        prepare_dataset(None, tmp_path / "out", PrepareOptions(), read_dataset_config(path))


def test_import_keeps_metadata_files_found_from_the_copy(tmp_path: Path) -> None:
    imported = import_dataset_config(_dataset(tmp_path))
    subsets = imported.tables["datasets"][0]["subsets"]
    assert [s["metadata_file"] for s in subsets] == [str(tmp_path / "meta_cap_dd.json"), str(tmp_path / "more.jsonl")]
    assert ("dataset datasets[0].subsets[0].metadata_file", "meta_cap_dd.json",
            "dataset.toml (dist-lora prepare --dataset-config)") in imported.mapped


def test_cli_prepare_with_a_metadata_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """sd-scripts' command-line fine-tuning dataset: in_json, train_data_dir and dataset_repeats."""
    _dataset(tmp_path)
    common = ["--resolution", "64", "--no-buckets"]
    assert main(["prepare", str(tmp_path / "ft"), str(tmp_path / "out"), "--metadata-file",
                 str(tmp_path / "meta_cap_dd.json"), "--repeats", "3", *common]) == 0
    manifest = Manifest.read(tmp_path / "out")
    assert manifest.raw["num_samples_with_repeats"] == 4 * 3
    captions = {k: m["txt"].decode() for k, m in shard_members(tmp_path / "out").items()}
    assert captions["00_meta_cap_dd/a"] == "a red cube,red, cube" and captions["00_meta_cap_dd/sub/d"] == ""
    # Absolute image paths need no folder.
    assert main(["prepare", str(tmp_path / "out2"), "--metadata-file", str(tmp_path / "more.jsonl"), *common]) == 0
    assert list(shard_members(tmp_path / "out2").values())[0]["txt"] == b"far away"
    capsys.readouterr()
    assert main(["prepare", str(tmp_path / "out3"), "--metadata-file", str(tmp_path / "meta_cap_dd.json"),
                 *common]) == 2
    assert "names image 'a' by a relative path" in capsys.readouterr().err
    assert main(["prepare", str(tmp_path / "out3"), "--metadata-file", str(tmp_path / "more.jsonl"),
                 "--dataset-config", str(tmp_path / "dataset.toml")]) == 2
    assert "not several" in capsys.readouterr().err
    assert main(["prepare", str(tmp_path / "out3"), "--dataset-config", str(tmp_path / "dataset.toml"),
                 "--mask-dir", str(tmp_path / "db")]) == 2
    assert "give each image-folder subset its masks as conditioning_data_dir" in capsys.readouterr().err
    assert main(["prepare", str(tmp_path / "out3"), "--metadata-file", str(tmp_path / "more.jsonl"),
                 "--reg", str(tmp_path / "db")]) == 2
    assert "--reg '" in capsys.readouterr().err
    assert not (tmp_path / "out3").exists()


def test_import_kohya_maps_in_json(tmp_path: Path) -> None:
    _dataset(tmp_path)
    config = tmp_path / "config.toml"
    config.write_text(f'pretrained_model_name_or_path = "/models/sd15.safetensors"\n'
                      f'train_data_dir = "{tmp_path / "ft"}"\nin_json = "{tmp_path / "meta_cap_dd.json"}"\n'
                      f'dataset_repeats = 5\nreg_data_dir = "{tmp_path / "db"}"\nresolution = "64,64"\n'
                      f'output_dir = "{tmp_path / "runs"}"\n')
    result = import_kohya_config(config, tmp_path / "imported")
    assert result.commands[0] == ["dist-lora", "prepare", str(tmp_path / "ft"), str(tmp_path / "imported" / "shards"),
                                  "--metadata-file", str(tmp_path / "meta_cap_dd.json"), "--repeats", "5",
                                  "--resolution", "64"]
    assert [(k, why) for k, _, why in result.report.no_effect if k == "reg_data_dir"] == [
        ("reg_data_dir", "in_json makes a fine-tuning dataset, which sd-scripts reads no regularization images for")]
    assert main(result.commands[0][1:] + ["--no-buckets"]) == 0
    assert Manifest.read(tmp_path / "imported" / "shards").raw["num_samples_with_repeats"] == 4 * 5


def test_wildcard_metadata_captions_get_the_tags_on_every_line(tmp_path: Path) -> None:
    """sd-scripts: with enable_wildcard the tags follow each caption line; without, the first line is the
    caption (tags appended to the whole text then end up on the last line, which is not read)."""
    path = _dataset(tmp_path)
    (tmp_path / "meta_cap_dd.json").write_text(json.dumps({"a": {"caption": "one\ntwo", "tags": "t1, t2"}}))
    for wildcard, want in ((True, "photo, one,t1, t2\nphoto, two,t1, t2"), (False, "photo, one")):
        out = tmp_path / f"out-{wildcard}"
        prepare_dataset(None, out, PrepareOptions(wildcard=wildcard), read_dataset_config(path))
        assert shard_members(out)["00_meta_cap_dd/a"]["txt"].decode() == want
