"""`dist-lora import-kohya`: every key of kohya_ss GUI configs and sd-scripts TOMLs mapped or reported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dist_lora.config import load_config
from dist_lora.importers.kohya_import import KohyaImportError, import_kohya_config, write_import

DATA = Path(__file__).resolve().parents[1] / "data"
USER = {"pretrained_model_name_or_path": "/models/sdxl.safetensors", "train_data_dir": "/data/img",
        "output_dir": "/runs", "output_name": "character"}


def _write(tmp_path: Path, content: dict[str, Any] | str, name: str = "config.json") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _every_key_once(source: dict[str, Any], result: Any) -> None:
    report = result.report
    reported = [k for k, _, _ in report.mapped + report.no_effect + report.unsupported]
    flat = {k: v for section in source.values() for k, v in section.items()} if all(
        isinstance(v, dict) for v in source.values()) else source
    assert sorted(set(reported)) == sorted(flat), set(flat) ^ set(reported)


def test_the_sdxl_character_preset(tmp_path: Path) -> None:
    preset = json.loads((DATA / "kohya_ss SDXL - LoRA AI_characters standard v1.1.json").read_text())
    config = {**preset, **USER}
    result = import_kohya_config(_write(tmp_path, config), tmp_path / "out")
    _every_key_once(config, result)
    raw = result.raw
    assert raw["network"] == {"type": "lora", "rank": 32, "alpha": 32.0, "train_text_encoder": True, "dropout": 0.0,
                              "rank_dropout": 0.0, "module_dropout": 0.0, "lokr_factor": -1,
                              "lokr_decompose_both": False}
    assert raw["optimizer"] == {"type": "adamw", "lr": 3e-05, "text_encoder_lr": 3e-05}
    assert raw["scheduler"] == {"type": "constant"}
    training = raw["training"]
    assert (training["epochs"], training["batch_size"], training["gradient_accumulation_steps"]) == (50, 3, 1)
    assert (training["mixed_precision"], training["min_snr_gamma"], training["attention"]) == ("fp16", 5.0, "xformers")
    assert training["gradient_checkpointing"] and training["vae_fp32"]
    assert raw["data"] == {"caption_dropout": 0.05, "keep_tokens": 0, "num_workers": 0, "shuffle_caption": False,
                           "caption_dropout_every_n_epochs": 0, "flip_aug": False, "color_aug": False,
                           "shards": str(tmp_path / "out" / "cached")}
    assert raw["model"] == {"pretrained": "/models/sdxl.safetensors", "clip_skip": 1, "max_token_length": 75}
    assert raw["output"] == {"dir": "/runs", "name": "character", "save_precision": "fp16", "save_every_epochs": 1,
                             "save_every_steps": 0}
    assert result.commands == [
        ["dist-lora", "prepare", "/data/img", str(tmp_path / "out" / "shards"), "--bucket-step", "64",
         "--max-bucket-side", "2048", "--min-bucket-side", "256", "--resolution", "1024"],
        ["dist-lora", "cache", str(tmp_path / "out" / "shards"), str(tmp_path / "out" / "cached"), "--model",
         "/models/sdxl.safetensors", "--no-text", "--clip-skip", "1", "--max-token-length", "75"]]
    assert [(k, v) for k, v, _ in result.report.unsupported] == [("train_on_input", True)]
    no_effect = {k: why for k, _, why in result.report.no_effect}
    assert no_effect["epoch"].startswith("overridden by max_train_epochs")
    assert no_effect["seed"] == "empty"
    assert {k: ours for k, _, ours in result.report.mapped if k in ("flip_aug", "color_aug", "random_crop")} == {
        "flip_aug": "data.flip_aug", "color_aug": "data.color_aug", "random_crop": "prepare:--random-crop"}
    assert no_effect["conv_dim"].startswith("LoRA without convolution layers")


SD15_PRESETS = {  # kohya_ss' own presets, as shipped
    "kohya_ss sd15 - EDG_LoConOptiSettings.json": (
        {"type": "locon", "rank": 64, "alpha": 64.0, "conv_rank": 32, "conv_alpha": 1.0, "train_text_encoder": True},
        ["--no-buckets", "--bucket-step", "64", "--resolution", "512"],
        [("max_resolution", "a non-square base resolution is not supported; square buckets of side 512 are used "
                            "(prepare --resolution 512)")]),
    "kohya_ss sd15-EDG_LoHaOptiSettings.json": (
        {"type": "loha", "rank": 32, "alpha": 32.0, "conv_rank": 32, "conv_alpha": 1.0, "train_text_encoder": True},
        ["--no-buckets", "--bucket-step", "64", "--resolution", "512"],
        [("max_resolution", "a non-square base resolution is not supported; square buckets of side 512 are used "
                            "(prepare --resolution 512)")]),
    "kohya_ss sd15 - LoKr v2.0.json": (
        {"type": "lokr", "rank": 100000, "alpha": 1.0, "conv_rank": 100000, "conv_alpha": 1.0, "lokr_factor": 6,
         "lokr_decompose_both": False, "preset": "full", "dropout": 0.0, "rank_dropout": 0.0, "module_dropout": 0.0,
         "train_text_encoder": True},
        ["--bucket-no-upscale", "--max-bucket-side", "2048", "--min-bucket-side", "256", "--resolution", "512"],
        [("bucket_reso_steps", "bucket sides are multiples of 8 here (the latent grid); the default 64 is used")]),
}


@pytest.mark.parametrize("name", sorted(SD15_PRESETS))
def test_the_sd15_lycoris_presets(name: str, tmp_path: Path) -> None:
    network, prepare_options, unsupported = SD15_PRESETS[name]
    config = {**json.loads((DATA / name).read_text()), **USER}
    result = import_kohya_config(_write(tmp_path, config), tmp_path / "out")
    _every_key_once(config, result)
    assert result.raw["network"] == network
    assert result.commands[0][4:] == prepare_options
    assert [(k, why) for k, _, why in result.report.unsupported] == unsupported
    no_effect = {k: why for k, _, why in result.report.no_effect}
    assert no_effect["lr_warmup"] == "off"  # "0", as the GUI writes it
    if "--no-buckets" in prepare_options:
        assert no_effect["bucket_no_upscale"] == "enable_bucket is off, and sd-scripts ignores it then"
    if network["type"] == "lokr":  # the GUI's shell-quoted optimizer arguments
        assert result.raw["optimizer"]["args"] == ["d0=1e-5", "d_coef=1.0", "weight_decay=0.4", "decouple=true",
                                                   "safeguard_warmup=true", "use_bias_correction=true"]
    write_import(result, tmp_path / "out", tmp_path / "config.json")  # the recipe validates


def test_locon_with_prodigy_and_warmup_percent(tmp_path: Path) -> None:
    config = {**USER, "LoRA_type": "LyCORIS/LoCon", "network_dim": 16, "network_alpha": 8, "conv_dim": 8,
              "conv_alpha": 4, "optimizer": "Prodigy", "learning_rate": 1.0, "unet_lr": 1.0, "text_encoder_lr": 0,
              "optimizer_args": "decouple=True weight_decay=0.01 d_coef=2 betas=0.9,0.99",
              "lr_scheduler": "cosine", "lr_warmup": 10, "max_train_steps": 1000, "flip_aug": True, "clip_skip": 2,
              "color_aug": True, "random_crop": True, "bucket_no_upscale": True, "masked_loss": True,
              "sample_prompts": "a dlsks robot --n blurry --w 512 --h 512\n# a comment\nsecond prompt",
              "sample_every_n_steps": 100, "sample_sampler": "euler_a", "noise_offset": 0.0357,
              "cache_latents": False}
    result = import_kohya_config(_write(tmp_path, config), tmp_path / "out")
    _every_key_once(config, result)
    raw = result.raw
    assert raw["network"]["type"] == "locon" and (raw["network"]["conv_rank"], raw["network"]["conv_alpha"]) == (8, 4.0)
    assert raw["network"]["train_text_encoder"] is False  # text_encoder_lr 0: kohya trains the UNet alone
    assert raw["optimizer"] == {"type": "prodigy", "lr": 1.0, "args": ["decouple=true", "weight_decay=0.01", "d_coef=2",
                                                                      "betas=[0.9,0.99]"]}
    assert raw["scheduler"] == {"type": "cosine", "warmup_steps": 100}
    assert raw["sample"] == {"prompts": ["a dlsks robot --n blurry --w 512 --h 512", "second prompt"],
                             "every_steps": 100, "sampler": "euler_a"}
    assert raw["model"]["clip_skip"] == 2 and raw["training"]["noise_offset"] == 0.0357
    assert raw["data"]["shards"] == str(tmp_path / "out" / "shards") and len(result.commands) == 1
    assert (raw["data"]["flip_aug"], raw["data"]["color_aug"], raw["training"]["masked_loss"]) == (True, True, True)
    assert result.commands[0][-2:] == ["--bucket-no-upscale", "--random-crop"]
    assert result.report.unsupported == []


@pytest.mark.parametrize(("gui", "expected"), [
    ({"LoRA_type": "LyCORIS/LoHa", "network_dim": 8, "network_alpha": 4, "conv_dim": 4, "conv_alpha": 2},
     {"type": "loha", "rank": 8, "alpha": 4.0, "conv_rank": 4, "conv_alpha": 2.0}),
    ({"LoRA_type": "LyCORIS/LoKr", "network_dim": 100000, "network_alpha": 1, "factor": 8, "decompose_both": True},
     {"type": "lokr", "rank": 100000, "alpha": 1.0, "lokr_factor": 8, "lokr_decompose_both": True}),
    ({"LoRA_type": "LyCORIS/LoCon", "dora_wd": True, "network_dim": 8, "network_alpha": 8},
     {"type": "dora", "rank": 8, "alpha": 8.0}),
    ({"LoRA_type": "LyCORIS/Diag-OFT", "network_dim": 16, "network_alpha": 1, "constrain": 0.01, "rescaled": False},
     {"type": "oft", "rank": 16, "alpha": 1.0, "oft_constraint": 0.01}),
    ({"LoRA_type": "LyCORIS/BOFT", "network_dim": 8, "network_alpha": 1, "constrain": 0.0, "rescaled": True},
     {"type": "boft", "rank": 8, "alpha": 1.0, "oft_constraint": 0.0}),
    ({"network_module": "lycoris.kohya", "network_args": "algo=diag-oft constraint=0.02 rescaled=False",
      "network_dim": 8}, {"type": "oft", "rank": 8, "oft_constraint": 0.02}),
])
def test_lycoris_types(gui: dict[str, Any], expected: dict[str, Any], tmp_path: Path) -> None:
    config = {**USER, **gui}
    result = import_kohya_config(_write(tmp_path, config), tmp_path / "out")
    if "network_args" not in gui:  # its options are reported one by one, under their own names
        _every_key_once(config, result)
    assert {k: v for k, v in result.raw["network"].items() if k != "train_text_encoder"} == expected
    # LyCORIS' rescale of OFT output channels is not trained here: reported when it was asked for.
    assert [k for k, _, _ in result.report.unsupported] == (["rescaled"] if gui.get("rescaled") else [])


SD_SCRIPTS_TOML = """
[model_arguments]
pretrained_model_name_or_path = "/models/sd15"
v2 = false

[network_arguments]
network_module = "networks.lora"
network_dim = 16
network_alpha = 8.0
network_args = ["conv_dim=4", "conv_alpha=1", "rank_dropout=0.1", "down_lr_weight=sine", "algo_x=1"]
network_train_unet_only = true

[optimizer_arguments]
optimizer_type = "AdamW8bit"
optimizer_args = ["weight_decay=0.1", "betas=0.9,0.99"]
learning_rate = 1e-4
lr_scheduler = "cosine_with_restarts"
lr_scheduler_num_cycles = 3
lr_warmup_steps = 50

[training_arguments]
train_batch_size = 2
max_train_steps = 2000
mixed_precision = "bf16"
xformers = true
seed = 1234
save_every_n_steps = 500
save_model_as = "safetensors"
masked_loss = true

[dataset_arguments]
train_data_dir = "/data/kohya"
resolution = "512,512"
enable_bucket = false
shuffle_caption = true
keep_tokens = 1
"""


def test_an_sd_scripts_config_file(tmp_path: Path) -> None:
    path = _write(tmp_path, SD_SCRIPTS_TOML, "config.toml")
    result = import_kohya_config(path, tmp_path / "out")
    import tomllib

    source = tomllib.loads(SD_SCRIPTS_TOML)
    reported = {k for k, _, _ in result.report.mapped + result.report.no_effect + result.report.unsupported}
    assert {k for section in source.values() for k in section} <= reported | {"network_args"}
    raw = result.raw
    assert raw["network"] == {"type": "locon", "rank": 16, "alpha": 8.0, "conv_rank": 4, "conv_alpha": 1.0,
                              "rank_dropout": 0.1, "down_lr_weight": "sine", "train_text_encoder": False}
    assert raw["optimizer"] == {"type": "adamw8bit", "lr": 1e-4, "args": ["weight_decay=0.1", "betas=[0.9,0.99]"]}
    assert raw["scheduler"] == {"type": "cosine_with_restarts", "num_cycles": 3, "warmup_steps": 50}
    assert raw["training"] == {"batch_size": 2, "max_steps": 2000, "mixed_precision": "bf16", "attention": "xformers",
                               "masked_loss": True,
                               "seed": 1234}
    assert result.commands == [["dist-lora", "prepare", "/data/kohya", str(tmp_path / "out" / "shards"), "--no-buckets",
                                "--resolution", "512"]]
    assert {k for k, _, _ in result.report.unsupported} == {"network_args algo_x"}
    written = write_import(result, tmp_path / "out", path)
    recipe = load_config(written[0])
    assert recipe.network.type == "locon" and recipe.optimizer.args == ["weight_decay=0.1", "betas=[0.9,0.99]"]
    assert "dist-lora prepare /data/kohya" in written[1].read_text()
    assert "masked_loss = True -> training.masked_loss" in written[2].read_text()


@pytest.mark.parametrize(("content", "name", "message"), [
    ("{not json", "bad.json", r"bad.json' is not valid JSON"),
    ("a = [", "bad.toml", r"bad.toml' is not valid TOML"),
    ({**USER, "LoRA_type": "LyCORIS/iA3"}, "c.json", r"c.json': LoRA_type 'LyCORIS/iA3' cannot be trained here"),
    ({**USER, "network_module": "networks.oft"}, "c.json", r"c.json': network_module 'networks.oft' sets the number "
                                                          r"of OFT blocks .* algo=diag-oft"),
    ({**USER, "network_dim": "many"}, "c.json", r"c.json': network_dim = 'many': 'many' is not a number"),
    ({**USER, "cache_latents": True, "color_aug": True}, "c.json", r"c.json': color_aug changes the images every"),
    ({**USER, "cache_latents": True, "random_crop": True}, "c.json", r"c.json': random_crop changes the images"),
    ({**USER, "optimizer": "DAdaptAdam"}, "c.json", r"optimizer = 'DAdaptAdam': 'DAdaptAdam' is not one of"),
])
def test_bad_configs_are_refused_naming_file_and_key(content: Any, name: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(KohyaImportError, match=message):
        import_kohya_config(_write(tmp_path, content, name), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_nothing_is_written_into_a_used_folder(tmp_path: Path) -> None:
    path = _write(tmp_path, {**USER, "network_dim": 8})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    result = import_kohya_config(path, tmp_path / "out")
    with pytest.raises(KohyaImportError, match="is not empty"):
        write_import(result, tmp_path / "out", path)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mine.txt"]


DATASET_TOML = """
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1
enable_wildcard = true
token_warmup_step = 100

[[datasets]]
resolution = 768
batch_size = 4
enable_bucket = true
max_bucket_reso = 1536
debug_dataset = false

  [[datasets.subsets]]
  image_dir = "chars/alice"
  num_repeats = 10
  class_tokens = "alice woman"
  face_crop_aug_range = [2.0, 4.0]

  [[datasets.subsets]]
  image_dir = "chars/bob"
  num_repeats = 5
  caption_dropout_rate = 0.1
  colour = "red"

  [[datasets.subsets]]
  image_dir = "reg"
  is_reg = true
  class_tokens = "woman"
  shuffle_caption = false
"""


def test_a_dataset_config_with_three_subsets(tmp_path: Path) -> None:
    for folder in ("chars/alice", "chars/bob", "reg"):
        (tmp_path / folder).mkdir(parents=True)
    dataset = _write(tmp_path, DATASET_TOML, "dataset.toml")
    main_config = {**USER, "train_batch_size": 2, "network_dim": 8, "dataset_config": "ignored.toml",
                   "caption_extension": ".txt"}
    result = import_kohya_config(_write(tmp_path, main_config), tmp_path / "out", dataset)
    report = result.report
    mapped = {k: ours for k, _, ours in report.mapped}
    copy = "dataset.toml (dist-lora prepare --dataset-config)"
    assert {k: v for k, v in mapped.items() if k.startswith("dataset ")} == {
        "dataset general.shuffle_caption": copy, "dataset general.caption_extension": copy,
        "dataset general.keep_tokens": copy, "dataset general.enable_wildcard": copy,
        "dataset datasets[0].resolution": copy,
        "dataset datasets[0].batch_size": "training.batch_size", "dataset datasets[0].enable_bucket": copy,
        "dataset datasets[0].max_bucket_reso": copy, **{f"dataset datasets[0].subsets[{i}].{k}": copy for i, k in (
            (0, "image_dir"), (0, "num_repeats"), (0, "class_tokens"), (1, "image_dir"), (1, "num_repeats"),
            (1, "caption_dropout_rate"), (2, "image_dir"), (2, "is_reg"), (2, "class_tokens"), (2, "shuffle_caption"))}}
    assert [(k, why) for k, _, why in report.unsupported] == [
        ("dataset general.token_warmup_step", "token warm-up is not implemented"),
        ("dataset datasets[0].subsets[0].face_crop_aug_range", "face-crop augmentation is not implemented"),
        ("dataset datasets[0].subsets[1].colour", "not a dataset config key known here")]
    no_effect = {k: why for k, _, why in report.no_effect}
    assert no_effect["train_data_dir"] == "the dataset config's subsets are read instead"
    assert no_effect["train_batch_size"] == "the dataset config sets batch_size = 4"
    assert no_effect["dataset_config"].startswith("--dataset-config ")
    assert "dataset datasets[0].debug_dataset" in no_effect
    assert result.raw["training"]["batch_size"] == 4 and "train_batch_size" not in mapped
    out = tmp_path / "out"
    # sd-scripts' --caption_extension is the subsets' fallback: prepare's own.
    assert mapped["caption_extension"] == "prepare:--caption-extension"
    assert result.commands == [["dist-lora", "prepare", str(out / "shards"), "--dataset-config",
                                str(out / "dataset.toml"), "--caption-extension", ".txt"]]
    write_import(result, out, tmp_path / "config.json")
    import tomllib

    from dist_lora.data.dataset_config import read_dataset_config

    written = tomllib.loads((out / "dataset.toml").read_text())
    assert "token_warmup_step" not in written["general"] and "batch_size" not in written["datasets"][0]
    spec = read_dataset_config(out / "dataset.toml")  # the copy is what prepare reads
    folders = ("chars/alice", "chars/bob", "reg")
    assert [s.image_dir for s in spec.subsets] == [(tmp_path / f).resolve() for f in folders]
    assert [s.captions for s in spec.subsets] == [{"shuffle": True, "keep_tokens": 1, "wildcard": True},
                                                  {"shuffle": True, "keep_tokens": 1, "wildcard": True,
                                                   "caption_dropout": 0.1},
                                                  {"shuffle": False, "keep_tokens": 1, "wildcard": True}]
    assert spec.prepare == {"resolution": 768, "buckets": True, "max_bucket_side": 1536}
    assert "colour = 'red': not a dataset config key known here" in (out / "import_report.txt").read_text()


def test_a_dataset_config_of_two_resolutions(tmp_path: Path) -> None:
    """sd-scripts' per-dataset resolution and bucket settings: kept per dataset in the copy, which prepares
    one folder with a bucket set each."""
    for folder in ("portraits", "landscapes"):
        (tmp_path / folder).mkdir()
    dataset = _write(tmp_path, """
[general]
enable_bucket = true
[[datasets]]
resolution = 512
batch_size = 2
  [[datasets.subsets]]
  image_dir = "portraits"
[[datasets]]
resolution = [768, 768]
batch_size = 2
max_bucket_reso = 1280
  [[datasets.subsets]]
  image_dir = "landscapes"
""", "dataset.toml")
    result = import_kohya_config(_write(tmp_path, {**USER, "dataset_config": str(dataset)}), tmp_path / "out", dataset)
    mapped = {k: ours for k, _, ours in result.report.mapped}
    assert mapped["dataset datasets[1].resolution"] == mapped["dataset datasets[1].max_bucket_reso"] == \
        "dataset.toml (dist-lora prepare --dataset-config)"
    write_import(result, tmp_path / "out", tmp_path / "config.json")
    from dist_lora.data.dataset_config import read_dataset_config

    spec = read_dataset_config(tmp_path / "out" / "dataset.toml")
    assert [s.buckets for s in spec.subsets] == [{"buckets": True, "resolution": 512},
                                                 {"buckets": True, "resolution": 768, "max_bucket_side": 1280}]
    assert "resolution" not in spec.prepare and result.raw["training"]["batch_size"] == 2


def test_a_dataset_config_with_a_missing_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "chars" / "alice").mkdir(parents=True)
    dataset = _write(tmp_path, DATASET_TOML, "dataset.toml")
    from dist_lora.data.dataset_config import DatasetConfigError

    with pytest.raises(DatasetConfigError, match=r"dataset.toml': datasets\[0\].subsets\[1\].image_dir = .*chars/bob' "
                                                 r"does not exist"):
        import_kohya_config(_write(tmp_path, {**USER, "dataset_config": str(dataset)}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_caption_separators(tmp_path: Path) -> None:
    config = {**USER, "keep_tokens_separator": "|||", "secondary_separator": ";;;", "shuffle_caption": True}
    result = import_kohya_config(_write(tmp_path, config), tmp_path / "out")
    assert result.raw["data"]["keep_tokens_separator"] == "|||" and result.raw["data"]["secondary_separator"] == ";;;"
    empty = import_kohya_config(_write(tmp_path, {**USER, "keep_tokens_separator": ""}), tmp_path / "out")
    assert "keep_tokens_separator" not in empty.raw.get("data", {})
    assert [k for k, _, _ in empty.report.no_effect] == ["keep_tokens_separator"]


@pytest.mark.parametrize(("keys", "model"), [
    ({"fp8_base": True}, {"base_dtype": "fp8", "fp8_text_encoders": True}),
    ({"fp8_base_unet": True}, {"base_dtype": "fp8"}),
    ({"fp8_base": False, "fp8_base_unet": "true"}, {"base_dtype": "fp8"}),
    ({"fp8_base": False, "fp8_base_unet": False}, {}),
])
def test_fp8_base_options(keys: dict[str, Any], model: dict[str, Any], tmp_path: Path) -> None:
    """sd-scripts: fp8_base stores the UNet and the text encoders in fp8, fp8_base_unet the UNet alone."""
    config = {**USER, **keys}
    result = import_kohya_config(_write(tmp_path, config), tmp_path / "out")
    _every_key_once(config, result)
    imported = {k: v for k, v in result.raw["model"].items() if k in ("base_dtype", "fp8_text_encoders")}
    assert imported == model
    off = [k for k, _, why in result.report.no_effect if why == "off"]
    assert sorted(off) == sorted(k for k, v in keys.items() if v is False)
    write_import(result, tmp_path / "out", tmp_path / "config.json")
    cfg = load_config(tmp_path / "out" / "train.toml")
    assert cfg.model.base_dtype == model.get("base_dtype", "auto")
    assert cfg.model.fp8_text_encoders == model.get("fp8_text_encoders", False)


def test_a_bad_fp8_value_is_refused_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(KohyaImportError, match="fp8_base_unet = 'sometimes'"):
        import_kohya_config(_write(tmp_path, {**USER, "fp8_base_unet": "sometimes"}), tmp_path / "out")


PRESET = DATA / "kohya_ss SDXL - LoRA AI_characters standard v1.1.json"


def test_a_preset_without_paths_is_imported_with_the_missing_values_marked(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import shutil
    import subprocess

    from dist_lora.cli import main

    out = tmp_path / "imported"
    assert main(["import-kohya", str(PRESET), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "train_data_dir is missing: marked <TRAIN_DATA_DIR>" in printed and "with --train-data-dir" in printed
    assert "pretrained_model_name_or_path is missing: marked <PRETRAINED_MODEL>" in printed
    assert "with --pretrained" in printed
    assert load_config(out / "train.toml").model.pretrained == "<PRETRAINED_MODEL>"
    script = (out / "prepare.sh").read_text()
    assert "<TRAIN_DATA_DIR>" in script and "<PRETRAINED_MODEL>" in script
    # The script stops before its first command, saying what is missing.
    # With no dist-lora on PATH: a command that ran would fail with 127, not 2.
    proc = subprocess.run([shutil.which("bash") or "/bin/bash", str(out / "prepare.sh")], capture_output=True,
                          text=True, timeout=60, env={"PATH": "/nonexistent"})
    assert proc.returncode == 2 and "--train-data-dir (train_data_dir)" in proc.stderr
    assert "--pretrained (pretrained_model_name_or_path)" in proc.stderr


def test_flags_supply_what_a_preset_leaves_out(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from dist_lora.cli import main

    preset = json.loads(PRESET.read_text())
    paths = {k: v for k, v in USER.items() if k != "output_name"}
    by_file = import_kohya_config(_write(tmp_path, {**preset, **paths, "reg_data_dir": "/data/reg"}),
                                  tmp_path / "a")
    assert main(["import-kohya", str(PRESET), str(tmp_path / "b"), "--train-data-dir", "/data/img", "--pretrained",
                 "/models/sdxl.safetensors", "--output-dir", "/runs", "--reg-data-dir", "/data/reg"]) == 0
    assert "missing" not in capsys.readouterr().out
    by_flags = import_kohya_config(PRESET, tmp_path / "a", supplied={
        "train_data_dir": "/data/img", "pretrained_model_name_or_path": "/models/sdxl.safetensors",
        "output_dir": "/runs", "reg_data_dir": "/data/reg"})
    assert by_flags.raw == by_file.raw and by_flags.commands == by_file.commands and not by_flags.missing
    assert "--reg" in by_flags.commands[0] and "exit 2" not in (tmp_path / "b" / "prepare.sh").read_text()
    assert load_config(tmp_path / "b" / "train.toml").output.dir == "/runs"


def test_a_flag_wins_over_the_files_value_and_says_so(tmp_path: Path) -> None:
    preset = json.loads(PRESET.read_text())
    result = import_kohya_config(_write(tmp_path, {**preset, **USER}), tmp_path / "out",
                                 supplied={"train_data_dir": "/elsewhere"})
    assert result.commands[0][2] == "/elsewhere"
    no_effect = {k: (v, why) for k, v, why in result.report.no_effect}
    assert no_effect["train_data_dir (in the file)"] == ("/data/img", "--train-data-dir /elsewhere is used instead")


@pytest.mark.parametrize("given,ours", [("AdamWScheduleFree", "adamw_schedulefree"), ("CAME", "came"),
                                        ("pytorch_optimizer.CAME", "came"), ("torch.optim.RAdam", "torch.optim.RAdam"),
                                        ("pytorch_optimizer.Lamb", "pytorch_optimizer.Lamb")])
def test_optimizer_names_and_import_paths(given: str, ours: str, tmp_path: Path) -> None:
    result = import_kohya_config(_write(tmp_path, {**USER, "optimizer": given}), tmp_path / "out")
    assert result.raw["optimizer"]["type"] == ours
