"""What each kohya_ss / sd-scripts training key becomes here: a config key (with its value converted), a
`dist-lora prepare` / `cache` option, or nothing, with the reason.

Keys are sd-scripts' argument names; the kohya_ss GUI's own names are translated first (``GUI_NAMES``).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# kohya_ss GUI key -> sd-scripts argument.
GUI_NAMES = {
    "epoch": "max_train_epochs", "network_dropout": "network_dropout", "optimizer": "optimizer_type",
    "lora_network_weights": "network_weights", "factor": "lokr_factor", "decompose_both": "decompose_both",
    "xformers": "attention", "sdxl_no_half_vae": "no_half_vae", "lr_warmup": "lr_warmup_percent",
    "sdxl_cache_text_encoder_outputs": "cache_text_encoder_outputs", "max_resolution": "resolution",
    "debiased_estimation_loss": "debiased_estimation", "LyCORIS_preset": "preset", "constrain": "constraint",
}

OPTIMIZERS = {"adamw": "adamw", "adamw8bit": "adamw8bit", "pagedadamw8bit": "paged_adamw8bit", "lion": "lion",
              "lion8bit": "lion8bit", "prodigy": "prodigy", "adafactor": "adafactor",
              "bitsandbytes.optim.pagedadamw8bit": "paged_adamw8bit", "prodigyopt.prodigy": "prodigy",
              "came": "came", "pytorch_optimizer.came": "came", "adopt": "adopt", "pytorch_optimizer.adopt": "adopt",
              "muon": "muon", "pytorch_optimizer.muon": "muon", "adamwschedulefree": "adamw_schedulefree",
              "schedulefree.adamwschedulefree": "adamw_schedulefree"}
SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial")
MIXED_PRECISIONS = {"fp16": "fp16", "bf16": "bf16", "no": "no", "fp32": "no"}
SAVE_PRECISIONS = {"fp16": "fp16", "bf16": "bf16", "float": "fp32", "fp32": "fp32"}
ATTENTION = {"xformers": "xformers", "sdpa": "sdpa", "none": "sdpa", "": "sdpa"}


class ImportValueError(ValueError):
    """A value this key cannot take here (the caller names the file and key)."""


class ImportUnsupported(ImportValueError):
    """A valid kohya value with no counterpart here: reported as unsupported, with the reason. ``fallback``,
    when given, is set instead (and the reason says so); otherwise the default stays."""

    def __init__(self, why: str, fallback: Any = None) -> None:
        super().__init__(why)
        self.fallback = fallback


def _resolution(value: Any) -> int:
    sides = _ints(value)
    if not sides:
        raise ImportValueError(f"{value!r} is not a resolution")
    if len(sides) > 1 and sides[1] != sides[0]:
        raise ImportUnsupported(f"a non-square base resolution is not supported; square buckets of side {sides[0]} "
                                f"are used (prepare --resolution {sides[0]})", fallback=sides[0])
    return sides[0]


# LyCORIS' module presets with an exact counterpart in network.preset.
LYCORIS_PRESETS = {"full": "full", "attn-mlp": "attn_ff", "attn-only": "attn"}


def _lycoris_preset(value: Any) -> str:
    name = str(value).strip().lower()
    if name not in LYCORIS_PRESETS:
        raise ImportUnsupported(f"LyCORIS preset {value!r} has no counterpart here (network.preset takes "
                                f"{', '.join(LYCORIS_PRESETS)} as full, attn_ff, attn)")
    return LYCORIS_PRESETS[name]


def _bucket_step(value: Any) -> int:
    step = _int(value)
    if step < 8 or step % 8:
        raise ImportUnsupported("bucket sides are multiples of 8 here (the latent grid); the default 64 is used")
    return step


def _int(value: Any) -> int:
    if isinstance(value, bool):
        raise ImportValueError(f"{value!r} is not a number")
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise ImportValueError(f"{value!r} is not a number") from exc
    if number != int(number):
        raise ImportValueError(f"{value!r} is not a whole number")
    return int(number)


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ImportValueError(f"{value!r} is not a number") from exc


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in ("true", "1", "yes"):
        return True
    if str(value).strip().lower() in ("false", "0", "no", ""):
        return False
    raise ImportValueError(f"{value!r} is not true or false")


def _ints(value: Any) -> list[int]:
    return [_int(v) for v in str(value).split(",") if v.strip()]


def _floats(value: Any) -> list[float]:
    return [_float(v) for v in str(value).split(",") if v.strip()]


def _choice(options: dict[str, str] | tuple[str, ...]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        key = str(value).strip().lower()
        table = options if isinstance(options, dict) else {o: o for o in options}
        if key not in table:
            raise ImportValueError(f"{value!r} is not one of {', '.join(sorted(set(table)))}")
        return table[key]
    return convert


def _optimizer_type(value: Any) -> str:
    """kohya's names, or (as sd-scripts takes them) any optimizer class by import path, kept as written."""
    text = str(value).strip()
    if text.lower() in OPTIMIZERS:
        return OPTIMIZERS[text.lower()]
    if "." in text and all(part.isidentifier() for part in text.split(".")):
        return text
    return _choice(OPTIMIZERS)(value)


def optimizer_args(value: Any) -> list[str]:
    """kohya's ``key=value key=value`` (values Python-ish: ``betas=0.9,0.99``, ``decouple=True``) as our
    TOML-valued ``key=value`` list."""
    # The GUI passes the text to a shell: "d0=1e-5" "d_coef=1.0" is quoted there.
    items = value if isinstance(value, list) else shlex.split(str(value))
    out = []
    for item in items:
        key, sep, raw = str(item).partition("=")
        if not sep:
            raise ImportValueError(f"optimizer argument {item!r} is not key=value")
        raw = raw.strip()
        if raw in ("True", "False"):
            raw = raw.lower()
        elif "," in raw and not raw.startswith("["):
            raw = f"[{raw}]"
        out.append(f"{key.strip()}={raw}")
    return out


@dataclass(frozen=True)
class Target:
    """Where a key goes: ``section.key`` of our config, or ``prepare:`` / ``cache:`` for the data commands."""

    key: str
    convert: Callable[[Any], Any] = lambda v: v


# sd-scripts argument -> our config key (or data command option).
MAPPED: dict[str, Target] = {
    "pretrained_model_name_or_path": Target("model.pretrained", str),
    "clip_skip": Target("model.clip_skip", _int),
    "max_token_length": Target("model.max_token_length", _int),
    "network_dim": Target("network.rank", _int),
    "network_alpha": Target("network.alpha", _float),
    "conv_dim": Target("network.conv_rank", _int),
    "conv_alpha": Target("network.conv_alpha", _float),
    "network_dropout": Target("network.dropout", _float),
    "rank_dropout": Target("network.rank_dropout", _float),
    "module_dropout": Target("network.module_dropout", _float),
    "block_dims": Target("network.block_dims", _ints),
    "block_alphas": Target("network.block_alphas", _floats),
    "conv_block_dims": Target("network.conv_block_dims", _ints),
    "conv_block_alphas": Target("network.conv_block_alphas", _floats),
    "down_lr_weight": Target("network.down_lr_weight", str),
    "mid_lr_weight": Target("network.mid_lr_weight", str),
    "up_lr_weight": Target("network.up_lr_weight", str),
    "block_lr_zero_threshold": Target("network.block_lr_zero_threshold", _float),
    "preset": Target("network.preset", _lycoris_preset),
    "lokr_factor": Target("network.lokr_factor", _int),
    "constraint": Target("network.oft_constraint", _float),
    "decompose_both": Target("network.lokr_decompose_both", parse_bool),
    "loraplus_lr_ratio": Target("network.loraplus_lr_ratio", _float),
    "loraplus_unet_lr_ratio": Target("network.loraplus_unet_lr_ratio", _float),
    "loraplus_text_encoder_lr_ratio": Target("network.loraplus_text_encoder_lr_ratio", _float),
    "network_weights": Target("network.init_from", str),
    "optimizer_type": Target("optimizer.type", _optimizer_type),
    "optimizer_args": Target("optimizer.args", optimizer_args),
    "learning_rate": Target("optimizer.lr", _float),
    "unet_lr": Target("optimizer.lr", _float),
    "text_encoder_lr": Target("optimizer.text_encoder_lr", _float),
    "max_grad_norm": Target("optimizer.max_grad_norm", _float),
    "lr_scheduler": Target("scheduler.type", _choice(SCHEDULERS)),
    "lr_warmup_steps": Target("scheduler.warmup_steps", _int),
    "lr_scheduler_num_cycles": Target("scheduler.num_cycles", _int),
    "lr_scheduler_power": Target("scheduler.power", _float),
    "seed": Target("training.seed", _int),
    "train_batch_size": Target("training.batch_size", _int),
    "gradient_accumulation_steps": Target("training.gradient_accumulation_steps", _int),
    "max_train_steps": Target("training.max_steps", _int),
    "max_train_epochs": Target("training.epochs", _int),
    "mixed_precision": Target("training.mixed_precision", _choice(MIXED_PRECISIONS)),
    "attention": Target("training.attention", _choice(ATTENTION)),
    "xformers_flag": Target("training.attention", lambda v: "xformers" if parse_bool(v) else "sdpa"),
    "sdpa": Target("training.attention", lambda v: "sdpa"),
    "gradient_checkpointing": Target("training.gradient_checkpointing", parse_bool),
    "no_half_vae": Target("training.vae_fp32", parse_bool),
    "noise_offset": Target("training.noise_offset", _float),
    "noise_offset_random_strength": Target("training.noise_offset_random_strength", parse_bool),
    "adaptive_noise_scale": Target("training.adaptive_noise_scale", _float),
    "multires_noise_iterations": Target("training.multires_noise_iterations", _int),
    "multires_noise_discount": Target("training.multires_noise_discount", _float),
    "ip_noise_gamma": Target("training.ip_noise_gamma", _float),
    "ip_noise_gamma_random_strength": Target("training.ip_noise_gamma_random_strength", parse_bool),
    "min_snr_gamma": Target("training.min_snr_gamma", _float),
    "min_timestep": Target("training.min_timestep", _int),
    "max_timestep": Target("training.max_timestep", _int),
    "zero_terminal_snr": Target("training.zero_terminal_snr", parse_bool),
    "scale_v_pred_loss_like_noise_pred": Target("training.scale_v_pred_loss_like_noise_pred", parse_bool),
    "debiased_estimation": Target("training.debiased_estimation", parse_bool),
    "v_pred_like_loss": Target("training.v_pred_like_loss", _float),
    "loss_type": Target("training.loss_type", _choice(("l2", "l1", "huber", "smooth_l1"))),
    "huber_schedule": Target("training.huber_schedule", _choice(("constant", "exponential", "snr"))),
    "huber_c": Target("training.huber_c", _float),
    "huber_scale": Target("training.huber_scale", _float),
    "prior_loss_weight": Target("training.prior_loss_weight", _float),
    "scale_weight_norms": Target("training.scale_weight_norms", _float),
    "shuffle_caption": Target("data.shuffle_caption", parse_bool),
    "keep_tokens": Target("data.keep_tokens", _int),
    "caption_dropout_rate": Target("data.caption_dropout", _float),
    "caption_tag_dropout_rate": Target("data.tag_dropout", _float),
    "caption_dropout_every_n_epochs": Target("data.caption_dropout_every_n_epochs", _int),
    "keep_tokens_separator": Target("data.keep_tokens_separator", str),
    "secondary_separator": Target("data.secondary_separator", str),
    "max_data_loader_n_workers": Target("data.num_workers", _int),
    "flip_aug": Target("data.flip_aug", parse_bool),
    "color_aug": Target("data.color_aug", parse_bool),
    "masked_loss": Target("training.masked_loss", parse_bool),
    "output_dir": Target("output.dir", str),
    "output_name": Target("output.name", str),
    "save_precision": Target("output.save_precision", _choice(SAVE_PRECISIONS)),
    "save_every_n_steps": Target("output.save_every_steps", _int),
    "save_every_n_epochs": Target("output.save_every_epochs", _int),
    "save_last_n_epochs": Target("output.save_last_n", _int),
    "sample_every_n_steps": Target("sample.every_steps", _int),
    "sample_every_n_epochs": Target("sample.every_epochs", _int),
    "sample_sampler": Target("sample.sampler", str),
    # The data commands.
    "train_data_dir": Target("prepare:src", str),
    "reg_data_dir": Target("prepare:--reg", str),
    "in_json": Target("prepare:--metadata-file", str),
    "dataset_repeats": Target("prepare:--repeats", _int),
    "resolution": Target("prepare:--resolution", _resolution),
    "min_bucket_reso": Target("prepare:--min-bucket-side", _int),
    "max_bucket_reso": Target("prepare:--max-bucket-side", _int),
    "bucket_reso_steps": Target("prepare:--bucket-step", _bucket_step),
    "enable_bucket": Target("prepare:buckets", parse_bool),
    "bucket_no_upscale": Target("prepare:--bucket-no-upscale", parse_bool),
    "random_crop": Target("prepare:--random-crop", parse_bool),
    "alpha_mask": Target("prepare:--alpha-mask", parse_bool),
    "enable_wildcard": Target("prepare:--enable-wildcard", parse_bool),
    "cache_latents": Target("cache:latents", parse_bool),
    "cache_latents_to_disk": Target("cache:latents", parse_bool),
    "cache_text_encoder_outputs": Target("cache:text", parse_bool),
}

# Keys that only steer the GUI, the launcher or kohya's own bookkeeping: they change nothing trained here.
NO_EFFECT = {
    "additional_parameters": "extra command-line text for sd-scripts; read it and set its options here",
    "training_comment": "a note stored in kohya's metadata",
    "num_cpu_threads_per_process": "accelerate's CPU thread count for the launcher",
    "persistent_data_loader_workers": "loader workers always persist across epochs here",
    "unit": "a GUI setting (DyLoRA unit)",
    "use_wandb": "set logging.wandb_project to log to Weights & Biases",
    "log_with": "set logging.wandb_project to log to Weights & Biases (TensorBoard is on by default)",
    "wandb_api_key": "Weights & Biases reads WANDB_API_KEY from the environment",
    "logging_dir": "metrics are written to the run folder (metrics.jsonl, TensorBoard)",
    "log_prefix": "metrics are written to the run folder",
    "mem_eff_attn": "training.attention chooses the attention kernel (sdpa by default)",
    "save_model_as": "adapters are saved as .safetensors",
    "save_state": "resumable checkpoints are written every checkpoint.every_steps",
    "vae_batch_size": "`dist-lora cache --batch-size` sets the encoding batch",
    "sdxl": "the model family is recognised from the model files",
    "v2": "the model family is recognised from the model files",
    "v_parameterization": "the prediction type is read from the model's scheduler config (model.prediction_type)",
    "noise_offset_type": "the noise options are read from their own keys",
    "lr_scheduler_args": "the scheduler options are scheduler.num_cycles / power",
    "dim_from_weights": "network.init_from takes the ranks from the file",
    "caption_extension": "`dist-lora prepare` reads .txt captions",
}

# Keys with no counterpart yet, or with another meaning here, and why.
UNSUPPORTED = {
    "rescaled": "OFT/BOFT's per-channel rescale is not trained here (AUTOMATIC1111 does not read it)",
    "weighted_captions": "prompt weighting in captions is not implemented",
    "stop_text_encoder_training_pct": "text encoders train for the whole run or not at all",
    "full_fp16": "adapters always train in fp32 (fp16 autocast otherwise)",
    "full_bf16": "adapters always train in fp32 (bf16 autocast otherwise)",
    "no_token_padding": "captions are always padded to the token window",
    "train_on_input": "a GUI option of other network types",
    "use_cp": "LyCORIS' CP/Tucker decomposition is not exposed",
    "use_tucker": "LyCORIS' CP/Tucker decomposition is not exposed",
    "save_last_n_steps": "output.save_last_n counts files, not steps",
    "save_last_n_steps_state": "checkpoint.keep counts checkpoints, not steps",
    "save_last_n_epochs_state": "checkpoint.keep counts checkpoints, not epochs",
    "lr_warmup_percent": "a warm-up in percent of the steps needs max_train_steps; set scheduler.warmup_steps",
    "max_bucket_area": "set `dist-lora prepare --max-bucket-area`",
}
