"""sd-scripts dataset configs: subsets into one manifest, and their caption options applied per sample."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from dist_lora.cli import main
from dist_lora.data.captions import CaptionPolicy, CaptionTransform
from dist_lora.data.dataset_config import DatasetConfigError, read_dataset_config
from dist_lora.data.kohya import DatasetFolderError
from dist_lora.data.manifest import Manifest
from dist_lora.data.prepare import PrepareOptions, prepare_dataset
from dist_lora.data.shards import ShardLoader
from tests.conftest import shard_members

CONFIG = """
[general]
shuffle_caption = true
keep_tokens = 1
caption_extension = ".txt"

[[datasets]]
resolution = 64
batch_size = 2
enable_bucket = false

  [[datasets.subsets]]
  image_dir = "a"
  num_repeats = 3
  class_tokens = "zkw cube"

  [[datasets.subsets]]
  image_dir = "b"
  caption_extension = ".caption"
  caption_dropout_rate = 1.0
  caption_prefix = "photo of"

  [[datasets.subsets]]
  image_dir = "reg"
  is_reg = true
  class_tokens = "cube"
  shuffle_caption = false
  caption_dropout_every_n_epochs = 2
"""


def _dataset(root: Path, config: str = CONFIG) -> Path:
    for folder, count in (("a", 3), ("b", 2), ("reg", 2)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", (96, 64), (i * 40, 20, 30)).save(root / folder / f"{i}.png")
    (root / "a" / "0.txt").write_text("red, cube, big, shiny, round\nsecond line")
    (root / "a" / "0.caption").write_text("not read: subset a reads .txt")
    (root / "b" / "0.caption").write_text("blue, sphere")
    (root / "b" / "sub").mkdir(exist_ok=True)
    Image.new("RGB", (64, 64)).save(root / "b" / "sub" / "nested.png")  # sd-scripts reads no sub-folders
    path = root / "dataset.toml"
    path.write_text(config)
    return path


def _samples(out: Path) -> dict[str, dict[str, object]]:
    """The samples' members, their JSON records parsed."""
    return {key: {ext: json.loads(data) if ext == "json" else data for ext, data in members.items()}
            for key, members in shard_members(out).items()}


def test_subsets_into_one_manifest(tmp_path: Path) -> None:
    spec = read_dataset_config(_dataset(tmp_path))
    assert spec.training == {"batch_size": 2}
    assert spec.prepare == {"resolution": 64, "buckets": False}
    report = prepare_dataset(None, tmp_path / "out", PrepareOptions(resolution=512), spec)
    assert (report.found, report.accepted) == (7, 7)
    manifest = Manifest.read(tmp_path / "out")
    assert manifest.resolution == 64 and manifest.raw["num_samples_with_repeats"] == 3 * 3 + 2 + 2
    # Each level cascades: [general] < dataset < subset; only what the file set is recorded.
    assert manifest.subset_options("captions") == [
        {"shuffle": True, "keep_tokens": 1},
        {"shuffle": True, "keep_tokens": 1, "caption_dropout": 1.0},
        {"shuffle": False, "keep_tokens": 1, "dropout_every_n_epochs": 2}]
    assert [(s["num_repeats"], s["is_reg"]) for s in manifest.subsets] == [(3, False), (1, False), (1, True)]
    samples = _samples(tmp_path / "out")
    assert set(samples) == {"00_a/0", "00_a/1", "00_a/2", "01_b/0", "01_b/1", "02_reg/0", "02_reg/1"}
    captions = {key: sample["txt"].decode() for key, sample in samples.items()}  # type: ignore[union-attr]
    assert captions["00_a/0"] == "red, cube, big, shiny, round"  # the first line of the .txt
    assert captions["00_a/1"] == "zkw cube"  # no caption file: the class tokens
    assert captions["01_b/0"] == "photo of blue, sphere" and captions["01_b/1"] == "photo of"
    assert captions["02_reg/0"] == "cube"
    metas = {key: sample["json"] for key, sample in samples.items()}
    assert [(metas[k]["subset"], metas[k]["repeats"], metas[k]["is_reg"]) for k in ("00_a/0", "01_b/0", "02_reg/1")] \
        == [(0, 3, False), (1, 1, False), (2, 1, True)]
    assert Image.open(io.BytesIO(samples["00_a/0"]["png"])).size == (64, 64)  # type: ignore[arg-type]
    assert [w["path"] for w in report.warnings] == ["01_b/1.png"]


def test_subset_caption_options_apply_per_sample(tmp_path: Path) -> None:
    prepare_dataset(None, tmp_path / "out", PrepareOptions(), read_dataset_config(_dataset(tmp_path)))
    manifest = Manifest.read(tmp_path / "out")
    # The training config's data.* options fill in what the dataset config left out: tag dropout here.
    default = CaptionTransform(tag_dropout=0.5)
    policy = CaptionPolicy.build(default, manifest.subset_options("captions"))
    loader = ShardLoader(tmp_path / "out", rank=0, world_size=1, batch_size=1, seed=5, num_workers=0,
                         captions=policy)
    originals = {key: s["txt"].decode() for key, s in _samples(tmp_path / "out").items()}  # type: ignore[union-attr]
    for epoch in (0, 1):
        got = {key: caption for batch in loader.epoch(epoch)
               for key, caption in zip(batch.keys, batch.captions, strict=True) if not key.startswith("pad:")}
        assert len(got) == 13
        for key, caption in got.items():
            source = key.split("#")[0]
            # Each sample's caption is its subset's transform with the draws keyed by (seed, epoch, key).
            expected = CaptionTransform(shuffle=source.startswith(("00", "01")), keep_tokens=1, tag_dropout=0.5,
                                        caption_dropout=1.0 if source.startswith("01") else 0.0,
                                        dropout_every_n_epochs=2 if source.startswith("02") else 0)
            assert caption == expected(originals[source], CaptionTransform.rng(5, epoch, key), epoch)
        assert all(got[k] == "" for k in got if k.startswith("01_b"))  # caption_dropout_rate 1
        reg = [got[k] for k in got if k.startswith("02_reg")]
        assert reg == (["cube", "cube"] if epoch == 0 else ["", ""])  # every 2nd epoch (kohya counts from 1)
        first_tags = {got[k].split(", ")[0] for k in got if k.startswith("00_a/0")}
        assert first_tags == {"red"}  # keep_tokens = 1
    shuffled = [c for batch in loader.epoch(0) for k, c in zip(batch.keys, batch.captions, strict=True)
                if k.startswith("00_a/0")]
    assert len(set(shuffled)) > 1  # three repeats, each drawn on its own


def test_cli_prepare_with_a_dataset_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _dataset(tmp_path)
    assert main(["prepare", str(tmp_path / "out"), "--dataset-config", str(path)]) == 0
    assert "set training.batch_size = 2" in capsys.readouterr().out
    assert len(Manifest.read(tmp_path / "out").subsets) == 3
    assert main(["prepare", str(tmp_path / "a"), str(tmp_path / "out2"), "--dataset-config", str(path)]) == 2
    assert "not several" in capsys.readouterr().err


@pytest.mark.parametrize(("change", "message"), [
    (("image_dir = \"b\"", "image_dir = \"missing\""), "datasets[0].subsets[1].image_dir = "),
    (("num_repeats = 3", "num_repeats = \"3\""), "datasets[0].subsets[0].num_repeats = '3': expected a whole number"),
    (("num_repeats = 3", "num_repats = 3"), "unknown key datasets[0].subsets[0].num_repats"),
    (("keep_tokens = 1", "keep_tokens = 1\nface_crop_aug_range = [2.0, 4.0]"),
     "general.face_crop_aug_range = [2.0, 4.0]: face-crop augmentation is not implemented"),
    (("resolution = 64", "resolution = [64, 128]"), "non-square base resolution"),
    (("caption_dropout_rate = 1.0", "caption_dropout_rate = 1.5"), "expected a probability between 0 and 1"),
    (("[[datasets]]", "[general2]\n[[datasets]]"), "unknown top-level key(s) ['general2']"),
    (("  [[datasets.subsets]]\n  image_dir = \"reg\"",
      "[[datasets]]\nresolution = 64\nbatch_size = 3\n  [[datasets.subsets]]\n  image_dir = \"reg\""),
     "datasets[1].batch_size = 3 differs from datasets[0].batch_size = 2"),
    (("  [[datasets.subsets]]\n  image_dir = \"reg\"",
      "[[datasets]]\nresolution = 96\nbatch_size = 2\n  [[datasets.subsets]]\n  image_dir = \"reg\""),
     "datasets[1].resolution = 96: expected a multiple of 64"),
    (("[general]", "[general"), "is not valid TOML"),
])
def test_bad_dataset_configs_name_the_key_and_write_nothing(tmp_path: Path, change: tuple[str, str],
                                                            message: str) -> None:
    assert change[0] in CONFIG
    path = _dataset(tmp_path, CONFIG.replace(*change, 1))
    with pytest.raises(DatasetConfigError) as caught:
        prepare_dataset(None, tmp_path / "out", PrepareOptions(), read_dataset_config(path))
    assert message in str(caught.value) and str(path) in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_reg_folder_and_dataset_config_are_refused_together(tmp_path: Path) -> None:
    spec = read_dataset_config(_dataset(tmp_path))
    with pytest.raises(DatasetFolderError, match="is_reg = true"):
        prepare_dataset(None, tmp_path / "out", PrepareOptions(reg_src=str(tmp_path / "reg")), spec)
    (tmp_path / "empty").mkdir()
    spec = read_dataset_config(_dataset(tmp_path, CONFIG.replace('image_dir = "b"', 'image_dir = "empty"')))
    with pytest.raises(DatasetFolderError, match=r"datasets\[0\].subsets\[1\].image_dir .* holds no images"):
        prepare_dataset(None, tmp_path / "out", PrepareOptions(), spec)
    assert not (tmp_path / "out").exists()


def test_subset_augmentation_masks_and_no_upscale(tmp_path: Path) -> None:
    config = CONFIG.replace("resolution = 64", "resolution = 128")  # the 96x64 images are within 128^2
    config = config.replace("enable_bucket = false", "enable_bucket = true\nbucket_no_upscale = true\n"
                            "min_bucket_reso = 64\nmax_bucket_reso = 128\nbucket_reso_steps = 16")
    config = config.replace('class_tokens = "zkw cube"', 'class_tokens = "zkw cube"\n  flip_aug = true\n'
                            '  random_crop = true\n  conditioning_data_dir = "masks"')
    config = config.replace('caption_prefix = "photo of"', 'caption_prefix = "photo of"\n  color_aug = true')
    path = _dataset(tmp_path, config)
    (tmp_path / "masks").mkdir()
    for i in range(3):
        Image.new("RGB", (96, 64), (255 if i else 0, 0, 0)).save(tmp_path / "masks" / f"{i}.png")
    spec = read_dataset_config(path)
    assert spec.prepare["no_upscale"] is True and spec.subsets[0].mask_dir == tmp_path / "masks"
    prepare_dataset(None, tmp_path / "out", PrepareOptions(), spec)
    manifest = Manifest.read(tmp_path / "out")
    assert manifest.subset_options("augment") == [{"flip": True}, {"color": True}, {}]
    assert manifest.has_masks and manifest.uncropped_samples == 3
    samples = _samples(tmp_path / "out")
    # Subset a: uncropped (random crop) with masks from the red channel; the others cropped, no mask.
    for key, sample in samples.items():
        meta = sample["json"]
        assert isinstance(meta, dict)
        assert ("mask.png" in sample, bool(meta.get("uncropped"))) == ((True, True) if key.startswith("00_a")
                                                                       else (False, False))
        # No upscaling: the 96x64 images keep their size, their bucket is exactly that.
        assert meta["resized_size"] == [64, 96] and meta["bucket"] == [96, 64]
    masks = {k: Image.open(io.BytesIO(s["mask.png"])).getpixel((5, 5)) for k, s in samples.items()  # type: ignore[arg-type]
             if "mask.png" in s}
    assert masks == {"00_a/0": 0, "00_a/1": 255, "00_a/2": 255}
    Image.new("RGB", (64, 64)).save(tmp_path / "masks" / "1.png")
    with pytest.raises(DatasetFolderError, match=r"datasets\[0\]\.subsets\[0\]\.conditioning_data_dir: mask .*1.png' "
                                                 r"is 64x64 but its image .*1.png' is 96x64"):
        prepare_dataset(None, tmp_path / "out2", PrepareOptions(), spec)
    # A subset without caption_extension uses prepare's (sd-scripts' --caption_extension), default .caption.
    spec = read_dataset_config(_dataset(tmp_path, CONFIG.replace('caption_extension = ".txt"', "")))
    prepare_dataset(None, tmp_path / "out3", PrepareOptions(caption_extension=".txt"), spec)
    assert _samples(tmp_path / "out3")["00_a/0"]["txt"] == b"red, cube, big, shiny, round"
    assert not (tmp_path / "out2").exists()


def test_subset_separators_apply_to_its_samples(tmp_path: Path) -> None:
    config = CONFIG.replace('  class_tokens = "zkw cube"', '  class_tokens = "zkw cube"\n'
                            '  keep_tokens_separator = "|||"\n  secondary_separator = ";;;"')
    path = _dataset(tmp_path, config)
    (tmp_path / "a" / "0.txt").write_text("zkw ||| red;;;cube, big, shiny ||| photo")
    prepare_dataset(None, tmp_path / "out", PrepareOptions(), read_dataset_config(path))
    manifest = Manifest.read(tmp_path / "out")
    assert manifest.subset_options("captions")[0] == {"shuffle": True, "keep_tokens": 1,
                                                       "keep_tokens_separator": "|||", "secondary_separator": ";;;"}
    policy = CaptionPolicy.build(CaptionTransform(), manifest.subset_options("captions"))
    loader = ShardLoader(tmp_path / "out", rank=0, world_size=1, batch_size=1, seed=5, num_workers=0, captions=policy)
    captions = {c for batch in loader.epoch(0) for k, c in zip(batch.keys, batch.captions, strict=True)
                if k.startswith("00_a/0")}
    assert len(captions) > 1
    for caption in captions:
        tags = caption.split(", ")
        assert tags[0] == "zkw" and tags[-1] == "photo" and sorted(tags[1:-1]) == ["big", "red,cube", "shiny"]


def test_wildcard_captions_keep_their_lines(tmp_path: Path) -> None:
    """A subset's enable_wildcard (or prepare --enable-wildcard for the rest) keeps every caption line;
    training picks one per sample and epoch."""
    from dist_lora.config import DataConfig
    from dist_lora.data.captions import caption_policy

    path = _dataset(tmp_path, CONFIG.replace('  class_tokens = "zkw cube"', '  class_tokens = "zkw cube"\n'
                                                                            '  enable_wildcard = true'))
    (tmp_path / "a" / "0.txt").write_text("red, {big|small} cube\n\n  second   line\n")
    (tmp_path / "b" / "0.caption").write_text("blue\nnot read: subset b has no wildcards")
    prepare_dataset(None, tmp_path / "out", PrepareOptions(), read_dataset_config(path))
    stored = {k: m["txt"].decode() for k, m in shard_members(tmp_path / "out").items()}
    assert stored["00_a/0"] == "red, {big|small} cube\nsecond line" and stored["01_b/0"] == "photo of blue"
    manifest = Manifest.read(tmp_path / "out")
    assert not manifest.wildcard_captions and manifest.subset_options("captions")[0]["wildcard"] is True
    loader = ShardLoader(tmp_path / "out", rank=0, world_size=1, batch_size=1, seed=5, num_workers=0,
                         captions=caption_policy(DataConfig(), manifest))
    seen = {c for epoch in range(4) for batch in loader.epoch(epoch)
            for k, c in zip(batch.keys, batch.captions, strict=True) if k.startswith("00_a/0")}
    assert seen <= {"red, big cube", "red, small cube", "second line"} and len(seen) >= 2
    # The command-line flag: every subset that does not say otherwise, and the manifest records it.
    prepare_dataset(None, tmp_path / "out2", PrepareOptions(wildcard=True), read_dataset_config(path))
    stored = {k: m["txt"].decode() for k, m in shard_members(tmp_path / "out2").items()}
    assert stored["01_b/0"] == "photo of blue\nphoto of not read: subset b has no wildcards"
    assert Manifest.read(tmp_path / "out2").wildcard_captions
