"""Training switches compared run against run, and SD 2.x (v-prediction) recognition."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dist_lora.adapters.inspect import describe_adapter
from dist_lora.config import config_from_dict
from dist_lora.models.load import inspect_model_source
from dist_lora.train.trainer import train
from tests.conftest import tiny_train_config


def test_gradient_checkpointing_changes_nothing_but_memory(tiny_models: dict[str, Path], shapes_shards: Path,
                                                          tmp_path: Path) -> None:
    results = []
    for gc in (False, True):
        raw = tiny_train_config(tiny_models["sdxl"], shapes_shards, tmp_path / f"gc_{gc}",
                                training={"gradient_checkpointing": gc, "max_steps": 3})
        results.append(train(config_from_dict(raw)))
    assert results[0].losses == results[1].losses
    a, b = (load_file(str(r.adapter_path)) for r in results)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


def test_gradient_accumulation_counts_optimizer_steps(tiny_models: dict[str, Path], shapes_shards: Path,
                                                     tmp_path: Path) -> None:
    raw = tiny_train_config(tiny_models["sd15"], shapes_shards, tmp_path / "accum",
                            training={"batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 3},
                            logging={"record_sample_keys": True})
    result = train(config_from_dict(raw))
    assert result.steps == 3 and len(result.losses) == 3
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    consumed = [json.loads(x) for x in (result.run_dir / "sample_keys.jsonl").read_text().splitlines()]
    assert len(consumed) == 6 and all(len(x["keys"]) == 2 for x in consumed)  # 3 steps x 2 micro-batches


def test_bf16_autocast_trains_on_cpu(tiny_models: dict[str, Path], shapes_shards: Path, tmp_path: Path) -> None:
    raw = tiny_train_config(tiny_models["sdxl"], shapes_shards, tmp_path / "bf16",
                            training={"mixed_precision": "bf16", "max_steps": 3})
    result = train(config_from_dict(raw))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    with safe_open(str(result.adapter_path), framework="pt") as f:
        assert f.metadata()["ss_mixed_precision"] == "bf16"


def test_sd2_v_prediction_is_recognised_and_trained(tiny_models: dict[str, Path], shapes_shards: Path,
                                                    tmp_path: Path) -> None:
    """An SD 2.x-like folder (OpenCLIP-style gelu text encoder, v-prediction scheduler)."""
    folder = tmp_path / "sd2"
    shutil.copytree(tiny_models["sd15"], folder)
    te_config = json.loads((folder / "text_encoder" / "config.json").read_text())
    (folder / "text_encoder" / "config.json").write_text(json.dumps({**te_config, "hidden_act": "gelu"}))
    sched_path = folder / "scheduler" / "scheduler_config.json"
    sched_path.write_text(json.dumps({**json.loads(sched_path.read_text()), "prediction_type": "v_prediction"}))
    source = inspect_model_source(str(folder))
    assert (source.family, source.prediction_type) == ("sd2", "v_prediction")
    result = train(config_from_dict(tiny_train_config(folder, shapes_shards, tmp_path / "run")))
    with safe_open(str(result.adapter_path), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["ss_v2"] == "True"
    assert meta["modelspec.prediction_type"] == "v"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"


@pytest.mark.parametrize("kind", ["locon", "loha", "lokr", "dora", "oft", "boft"])
def test_trainer_trains_and_exports_every_type(kind: str, tiny_models: dict[str, Path], shapes_shards: Path,
                                               tmp_path: Path) -> None:
    raw = tiny_train_config(tiny_models["sdxl"], shapes_shards, tmp_path / kind,
                            network={"type": kind, "conv_rank": 2, "conv_alpha": 1.0, "train_text_encoder": True,
                                     "text_encoders": "te2", **({"rank": 6} if kind == "boft" else {})},
                            training={"max_steps": 2})
    result = train(config_from_dict(raw))
    info = describe_adapter(result.adapter_path)
    assert info["type"] == kind
    assert set(info["modules"]) == {"unet", "te2"}  # only the second encoder was trained
    algo = {"dora": "locon", "oft": "diag-oft"}.get(kind, kind)
    assert json.loads(info["metadata"]["ss_network_args"])["algo"] == algo
    assert info["metadata"]["ss_network_module"] == "lycoris.kohya"


def test_init_from_continues_from_a_file(tiny_models: dict[str, Path], shapes_shards: Path, tmp_path: Path) -> None:
    first = train(config_from_dict(tiny_train_config(tiny_models["sd15"], shapes_shards, tmp_path / "a",
                                                     network={"type": "loha", "rank": 2, "alpha": 1.0})))
    # A second run that barely moves (tiny lr) must start from exactly the first run's tensors.
    raw = tiny_train_config(tiny_models["sd15"], shapes_shards, tmp_path / "b",
                            network={"init_from": str(first.adapter_path), "type": "lora", "rank": 8},
                            optimizer={"lr": 1e-12}, training={"max_steps": 1})
    second = train(config_from_dict(raw))
    a, b = load_file(str(first.adapter_path)), load_file(str(second.adapter_path))
    assert a.keys() == b.keys() and any(k.endswith("hada_w1_a") for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)


def test_adamw8bit_without_bitsandbytes_trains_with_adamw(monkeypatch: pytest.MonkeyPatch, tiny_models: dict[str, Path],
                                                          shapes_shards: Path, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    raw = tiny_train_config(tiny_models["sd15"], shapes_shards, tmp_path / "run", optimizer={"type": "adamw8bit"},
                            training={"max_steps": 2})
    with pytest.warns(UserWarning, match="'adamw8bit' replaced by torch.optim.AdamW"):
        result = train(config_from_dict(raw))
    assert all(json.loads(x)["optimizer"] == "torch.optim.AdamW"
               for x in (result.run_dir / "metrics.jsonl").read_text().splitlines())
    with safe_open(str(result.adapter_path), framework="pt") as f:
        assert f.metadata()["ss_optimizer"] == "torch.optim.AdamW"


def test_text_encoder_adapters_train_under_gradient_checkpointing(tiny_models: dict[str, Path],
                                                                  shapes_shards: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers 4.x checkpoints reentrantly unless told otherwise and makes the embeddings' output
    require grad only for models it loaded adapters into itself, so adapters inside the checkpointed
    encoder layers get no gradient. Emulate those defaults and check the encoders still train, exactly
    as without checkpointing."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.gradient_checkpointing_enable

    def reentrant_by_default(self, gradient_checkpointing_kwargs=None):  # type: ignore[no-untyped-def]
        return original(self, gradient_checkpointing_kwargs=gradient_checkpointing_kwargs or {"use_reentrant": True})

    monkeypatch.setattr(PreTrainedModel, "gradient_checkpointing_enable", reentrant_by_default)
    monkeypatch.setattr(PreTrainedModel, "enable_input_require_grads", lambda self: None)
    adapters = []
    for gc in (False, True):
        raw = tiny_train_config(tiny_models["sd15"], shapes_shards, tmp_path / f"te_gc_{gc}",
                                network={"train_text_encoder": True},
                                training={"gradient_checkpointing": gc, "max_steps": 2})
        adapters.append(load_file(str(train(config_from_dict(raw)).adapter_path)))
    text_up = [k for k in adapters[0] if k.startswith("lora_te_") and k.endswith("lora_up.weight")]
    assert text_up
    for key in text_up:  # lora_up starts at zero: a non-zero one received gradients
        assert adapters[1][key].abs().sum() > 0, key
    for key in adapters[0]:
        torch.testing.assert_close(adapters[1][key], adapters[0][key], atol=1e-6, rtol=0)


# Every noise, timestep and loss option at once, on a v-prediction model (zero terminal SNR needs one).
OBJECTIVE_OPTIONS = {"loss_type": "huber", "huber_schedule": "snr", "huber_c": 0.2, "debiased_estimation": True,
                     "scale_v_pred_loss_like_noise_pred": True, "min_snr_gamma": 5.0, "zero_terminal_snr": True,
                     "noise_offset": 0.1, "noise_offset_random_strength": True, "adaptive_noise_scale": 0.2,
                     "multires_noise_iterations": 4, "multires_noise_discount": 0.4, "ip_noise_gamma": 0.1,
                     "ip_noise_gamma_random_strength": True, "min_timestep": 100, "max_timestep": 900,
                     "v_pred_like_loss": 0.1}


def test_noise_and_loss_options_stay_keyed_per_sample(tiny_models: dict[str, Path], shapes_shards: Path,
                                                     tmp_path: Path) -> None:
    """Batch 4 and batch 2 x 2 accumulation draw the same per-sample noise and adapter-dropout masks under
    every option (text-encoder adapters trained too), so they train the same adapter; with the options off
    the adapter differs."""
    def run(name: str, dropout: bool, **training: object) -> tuple[dict[str, torch.Tensor], list[float], Path]:
        network = {"train_text_encoder": True, **({"rank_dropout": 0.3, "module_dropout": 0.2} if dropout else {})}
        raw = tiny_train_config(tiny_models["sd15"], shapes_shards, tmp_path / name, network=network,
                                training={"max_steps": 3, **training})
        raw["model"]["prediction_type"] = "v_prediction"
        result = train(config_from_dict(raw))
        return load_file(str(result.adapter_path)), result.losses, result.adapter_path

    whole, whole_losses, path = run("whole", True, batch_size=4, **OBJECTIVE_OPTIONS)
    split, split_losses, _ = run("split", True, batch_size=2, gradient_accumulation_steps=2, **OBJECTIVE_OPTIONS)
    plain, _, _ = run("plain", False, batch_size=4)
    assert all(torch.isfinite(torch.tensor(whole_losses)))
    torch.testing.assert_close(torch.tensor(split_losses), torch.tensor(whole_losses), rtol=1e-5, atol=1e-7)
    # Adam divides by the root of tiny second moments, so summation-order differences of the two splits
    # show in the weights at ~1e-5 (of moves ~3e-2); the losses above agree to 1e-7.
    for key in whole:
        torch.testing.assert_close(split[key], whole[key], rtol=1e-3, atol=5e-5, msg=key)
    assert any(not torch.allclose(plain[k], whole[k], atol=1e-5) for k in whole)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert (meta["ss_loss_type"], meta["ss_huber_schedule"], meta["ss_huber_c"]) == ("huber", "snr", "0.2")
    assert (meta["ss_zero_terminal_snr"], meta["ss_debiased_estimation"]) == ("True", "True")
    assert (meta["ss_multires_noise_iterations"], meta["ss_ip_noise_gamma"]) == ("4", "0.1")
    network_args = json.loads(meta["ss_network_args"])
    assert (network_args["rank_dropout"], network_args["module_dropout"]) == ("0.3", "0.2")


def test_zero_terminal_snr_on_an_epsilon_model_is_refused_before_loading(tiny_models: dict[str, Path],
                                                                         shapes_shards: Path, tmp_path: Path) -> None:
    from dist_lora.train.objective import ObjectiveError

    raw = tiny_train_config(tiny_models["sd15"], shapes_shards, tmp_path / "run", training={"zero_terminal_snr": True})
    with pytest.raises(ObjectiveError, match=r"zero_terminal_snr = true needs a v_prediction model, but this one "
                                             r"predicts epsilon"):
        train(config_from_dict(raw))
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_options_of_the_wrong_family_are_refused_before_loading(tiny_models: dict[str, Path],
                                                                    shapes_shards: Path, tmp_path: Path) -> None:
    from dist_lora.errors import DistLoraError

    raw = tiny_train_config(tiny_models["sdxl"], shapes_shards, tmp_path / "run", network={"block_dims": [4] * 25})
    with pytest.raises(DistLoraError, match=r"network.block_dims has 25 values; a sdxl UNet has 23 kohya blocks"):
        train(config_from_dict(raw))
    raw = tiny_train_config(tiny_models["sdxl"], shapes_shards, tmp_path / "run")
    raw["model"]["clip_skip"] = 2
    with pytest.raises(DistLoraError, match=r"model.clip_skip = 2 has no meaning for SDXL"):
        train(config_from_dict(raw))
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_scale_weight_norms_caps_every_exported_update(tiny_models: dict[str, Path], shapes_shards: Path,
                                                       tmp_path: Path) -> None:
    limit = 0.02
    raw = tiny_train_config(tiny_models["sd15"], shapes_shards, tmp_path / "run",
                            training={"max_steps": 3, "scale_weight_norms": limit})
    result = train(config_from_dict(raw))
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("keys_scaled" in r for r in records) and records[-1]["keys_scaled"] > 0
    assert records[-1]["max_key_norm"] == pytest.approx(limit, rel=1e-4)
    # From the file alone: each module's update, up @ down * alpha / dim, is no longer than the limit.
    tensors = load_file(str(result.adapter_path))
    norms = []
    for key in (k for k in tensors if k.endswith(".lora_down.weight")):
        module = key.removesuffix(".lora_down.weight")
        down, up = tensors[key].flatten(1), tensors[f"{module}.lora_up.weight"].flatten(1)
        norms.append(((up @ down) * tensors[f"{module}.alpha"] / down.shape[0]).norm().item())
    assert max(norms) <= limit * (1 + 1e-4) and max(norms) > limit * 0.99
    with safe_open(str(result.adapter_path), framework="pt") as f:
        assert f.metadata()["ss_scale_weight_norms"] == str(limit)


def test_samples_of_the_average_under_zero3_are_refused_before_loading(
        tiny_models: dict[str, Path], shapes_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dist_lora.train.trainer import RunSetupError, preflight

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    raw = tiny_train_config(tiny_models["sd15"], shapes_shards, tmp_path / "run",
                            sample={"prompts": ["a dlsks red square --s 2"]})
    preflight(config_from_dict(raw))  # samples of the trained weights render under ZeRO-3
    raw["ema"] = {"decay": 0.9, "sample": True}
    with pytest.raises(RunSetupError, match=r"ema.sample = true .*ZeRO-3.*ema.sample = false"):
        preflight(config_from_dict(raw))
