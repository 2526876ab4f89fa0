"""The training configuration's sections: one dataclass per component, every field with a one-line ``doc``
and its constraints in ``metadata`` (from which ``dist_lora.config`` validates and writes the reference)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


def _field(default: Any, doc: str, *, minimum: float | None = None, maximum: float | None = None,
           required: bool = False, exclusive_min: bool = False) -> Any:
    meta = {"doc": doc, "min": minimum, "max": maximum, "required": required, "exclusive_min": exclusive_min}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    pretrained: str = _field("", "Base model: a diffusers folder, a hub id, or a single-file .safetensors "
                             "checkpoint (A1111/Civitai style).", required=True)
    base: Literal["auto", "sd1", "sd2", "sdxl"] = _field(
        "auto", "Model family; 'auto' recognises it from the files (SDXL: two text encoders; SD 2.x: "
        "OpenCLIP text encoder).")
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = _field(
        "auto", "Training target; 'auto' takes it from the model's scheduler config (SD 2.x 768 uses "
        "v_prediction).")
    config_dir: str = _field("", "For single-file checkpoints: a diffusers folder whose component configs "
                             "to use (otherwise fetched from the hub or its local cache).")
    clip_skip: int = _field(1, "kohya's clip_skip (SD 1.x/2.x): condition on the hidden states of the N-th last text-"
                            "encoder layer, through its final layer norm; 1 is the last layer, 2 the usual anime "
                            "setting. SDXL always uses the penultimate layer (kohya ignores clip_skip there).",
                            minimum=1, maximum=12)
    max_token_length: Literal[75, 150, 225] = _field(
        75, "kohya's max_token_length: captions up to this many tokens, encoded as 1, 2 or 3 windows of 75 and "
        "joined as kohya and AUTOMATIC1111 do (longer ones are cut).")
    base_dtype: Literal["auto", "fp8", "nf4", "int8"] = _field(
        "auto", "How the frozen UNet's weights are stored: 'auto' in the compute dtype (training.mixed_precision); "
        "'fp8' linear and convolution weights in float8_e4m3fn, one byte each, upcast per layer as it runs (kohya: "
        "fp8_base_unet); 'nf4' / 'int8' linear weights quantised by bitsandbytes (4-bit NormalFloat, or int8 per "
        "row), LoRA on top as in QLoRA, convolutions in the compute dtype. Adapters train in fp32 on any of them.")
    fp8_text_encoders: bool = _field(
        False, "With base_dtype = 'fp8', store the text encoders' linear weights in fp8 too (kohya: fp8_base, which "
        "covers UNet and text encoders).")
    offload_frozen: bool = _field(
        False, "Keep the VAE and frozen text encoders in (pinned) host memory and copy them to the GPU only while "
        "they encode each batch, sample or validation round, so the UNet's step has the GPU to itself. Costs one "
        "host-to-GPU copy of their weights per step (SDXL in bf16: 1.7 GB); cached latents and text avoid both.")


@dataclass
class DataConfig:
    shards: str = _field("", "Folder written by `dist-lora prepare` (holds manifest.json and the .tar "
                         "shards).", required=True)
    num_workers: int = _field(1, "DataLoader worker processes per rank that decode shards.", minimum=0)
    shuffle_buffer: int = _field(64, "Samples held in each worker's shuffle buffer (0 disables sample "
                                 "shuffling; shard order is always shuffled per epoch).", minimum=0)
    shard_urls: str = _field(
        "", "Read the shards from here instead of the `shards` folder (whose manifest.json is still used): a "
        "brace pattern such as '/data/train-{000000..000127}.tar' or a 'pipe:' command such as "
        "'pipe:aws s3 cp s3://bucket/train-{000000..000127}.tar -'. Listed in the manifest's order.")
    use_cache: bool = _field(True, "Use the latents and text-encoder outputs that `dist-lora cache` added to the "
                             "shards; the VAE (and text encoders) are then not loaded at all.")
    shuffle_caption: bool = _field(False, "Shuffle the comma-separated tags of each caption (kohya: "
                                   "shuffle_caption); the trigger word stays first.")
    keep_tokens: int = _field(0, "Leading caption tags that are never shuffled or dropped (kohya: keep_tokens).",
                              minimum=0)
    caption_dropout: float = _field(0.0, "Probability that a sample's whole caption is replaced by '' (kohya: "
                                    "caption_dropout_rate).", minimum=0.0, maximum=1.0)
    tag_dropout: float = _field(0.0, "Probability that each tag after keep_tokens is dropped (kohya: "
                                "caption_tag_dropout_rate).", minimum=0.0, maximum=1.0)
    caption_dropout_every_n_epochs: int = _field(
        0, "Train every N-th epoch (counted from 1) with empty captions (kohya: caption_dropout_every_n_epochs); 0: "
        "never.", minimum=0)
    keep_tokens_separator: str = _field(
        "", "Where a caption holds this text (e.g. '|||'), the tags before it, and after a second one, are never "
        "shuffled or dropped, instead of the first keep_tokens (kohya: keep_tokens_separator); it is removed from "
        "the caption either way (sd-scripts leaves it in when neither shuffle_caption nor tag_dropout is on).")
    secondary_separator: str = _field(
        "", "Joins the words of one tag so they move and drop together (e.g. 'red;;;cube'); replaced by a comma "
        "once the tags are placed (kohya: secondary_separator).")
    flip_aug: bool = _field(False, "Mirror each sample left-right with probability 0.5 each epoch (kohya: "
                            "flip_aug); with cached latents, cache them with `dist-lora cache --flip-aug`.")
    color_aug: bool = _field(False, "kohya's color_aug: a hue shift of up to 16 degrees or a gamma of 0.95-1.05, "
                             "on a third of the samples each epoch; needs images (data.use_cache = false for "
                             "cached latents).")


@dataclass
class NetworkConfig:
    type: Literal["lora", "locon", "loha", "lokr", "dora", "oft", "boft"] = _field(
        "lora", "Adapter type: lora (kohya LoRA), locon (LoRA on conv layers too), loha (Hadamard product), "
        "lokr (Kronecker product), dora (weight-decomposed LoRA), oft (orthogonal rotation of each layer's output "
        "channels in blocks, LyCORIS diag-oft), boft (butterfly OFT).")
    rank: int = _field(16, "Adapter rank (kohya: network_dim); for oft/boft the largest block size, split as "
                       "LyCORIS does (oft: blocks of b <= rank channels with b no larger than the block count; boft: "
                       "even b, a power-of-two number of blocks).", minimum=1)
    alpha: float = _field(16.0, "Adapter alpha (kohya: network_alpha); the update is scaled by alpha/rank.",
                          minimum=0.0, exclusive_min=True)
    conv_rank: int = _field(0, "Rank of adapters on 3x3 convolutions (kohya: conv_dim); 0 means rank.", minimum=0)
    conv_alpha: float = _field(0.0, "Alpha of adapters on 3x3 convolutions (kohya: conv_alpha); 0 means alpha.",
                               minimum=0.0)
    preset: Literal["auto", "attn", "attn_ff", "full"] = _field(
        "auto", "Which UNet layers get adapters: attn (attention projections), attn_ff (every linear of the "
        "transformer blocks, kohya's LoRA), full (plus resnet and sampler convolutions, LyCORIS' default); auto: "
        "attn_ff for lora/dora, full for locon/loha/lokr.")
    unet_target_modules: list[str] = _field(
        [], "Explicit UNet module name suffixes to adapt (overrides preset), e.g. ['to_q', 'to_v'].")
    down_rank: int = _field(0, "Rank override for down blocks (incl. conv_in side); 0 keeps rank/conv_rank.",
                            minimum=0)
    mid_rank: int = _field(0, "Rank override for the mid block; 0 keeps rank/conv_rank.", minimum=0)
    up_rank: int = _field(0, "Rank override for up blocks; 0 keeps rank/conv_rank.", minimum=0)
    down_alpha: float = _field(0.0, "Alpha override for down blocks; 0 keeps alpha/conv_alpha.", minimum=0.0)
    mid_alpha: float = _field(0.0, "Alpha override for the mid block; 0 keeps alpha/conv_alpha.", minimum=0.0)
    up_alpha: float = _field(0.0, "Alpha override for up blocks; 0 keeps alpha/conv_alpha.", minimum=0.0)
    block_dims: list[int] = _field(
        [], "kohya's block_dims: one rank per UNet block, 25 for SD 1.x/2.x (IN00-IN11, MID, OUT00-OUT11) and 23 for "
        "SDXL (0, IN0-IN8, MID0-MID2, OUT0-OUT8, 22), numbered as sd-scripts does; 0 leaves a block without "
        "adapters. Replaces rank (and down/mid/up_rank) on linear and 1x1 layers; [] disables it.")
    block_alphas: list[float] = _field([], "kohya's block_alphas: one alpha per block, as block_dims; [] means alpha.")
    conv_block_dims: list[int] = _field(
        [], "kohya's conv_block_dims: one rank per block for 3x3 convolutions; [] means conv_rank (or, without it, "
        "the block's block_dims rank).")
    conv_block_alphas: list[float] = _field([], "kohya's conv_block_alphas: one alpha per block for 3x3 "
                                            "convolutions; [] means conv_alpha (or alpha).")
    down_lr_weight: str = _field(
        "", "kohya's down_lr_weight: learning-rate multipliers of the down blocks (12 for SD 1.x/2.x, 9 for SDXL, "
        "shallow to deep), as '1,1,0.5,...' (missing ones are 1) or a curve: cosine, sine, linear, "
        "reverse_linear, zeros, with an optional '+base' (e.g. 'sine+0.5'). Blocks at weight 0 get no adapters.")
    mid_lr_weight: str = _field("", "kohya's mid_lr_weight: multipliers of the mid block (1 for SD 1.x/2.x, 3 for "
                                "SDXL), as '0.5' or '1,0.5,1'.")
    up_lr_weight: str = _field("", "kohya's up_lr_weight: multipliers of the up blocks (deep to shallow), as "
                               "down_lr_weight.")
    block_lr_zero_threshold: float = _field(0.0, "kohya's block_lr_zero_threshold: block weights at or below it "
                                            "count as 0 (no adapters).", minimum=0.0)
    dora_axis: Literal["auto", "input", "output"] = _field(
        "auto", "DoRA: keep the magnitude per input column (dora_scale [1, in]: what AUTOMATIC1111 and ComfyUI apply "
        "exactly) or per output row ([out, 1]: peft's and diffusers' convention, LyCORIS' default); auto: input for "
        "kohya-format files, output for the diffusers layout.")
    lokr_factor: int = _field(-1, "LoKr: Kronecker factor of each dimension (-1: as balanced as possible).",
                              minimum=-1)
    lokr_decompose_both: bool = _field(False, "LoKr: also low-rank decompose the first (smaller) factor.")
    dropout: float = _field(0.0, "Dropout on the adapter's input (lora/locon/dora) or module dropout "
                            "(loha/lokr/oft/boft).", minimum=0.0, maximum=1.0)
    oft_constraint: float = _field(
        0.0, "oft/boft (LyCORIS and kohya: constraint, network_alpha of networks.oft): bound each module's "
        "||Q|| (Q = B - B^T of its blocks) to this times its output channels (COFT); 0: no bound. alpha has no "
        "other meaning for oft/boft.", minimum=0.0)
    rank_dropout: float = _field(0.0, "kohya's rank_dropout (lora/locon): in training, each rank channel of an "
                                 "adapter's down projection is zeroed with this probability and the rest scaled by "
                                 "1/(1-p); drawn per sample.", minimum=0.0, maximum=0.99)
    module_dropout: float = _field(0.0, "kohya's module_dropout (lora/locon): in training, an adapter is skipped with "
                                   "this probability, drawn per sample (kohya: per batch).", minimum=0.0, maximum=0.99)
    train_text_encoder: bool = _field(False, "Also train adapters on the text encoder(s).")
    text_encoders: Literal["all", "te1", "te2"] = _field(
        "all", "With train_text_encoder on SDXL: adapt both encoders, or only the first (CLIP-L) or second (bigG).")
    text_encoder_target_modules: list[str] = _field(
        ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
        "Text-encoder module name suffixes that receive an adapter (attention and MLP, as kohya).")
    loraplus_lr_ratio: float = _field(0.0, "LoRA+ (Hayou et al. 2024; kohya and LyCORIS network_args "
                                      "loraplus_lr_ratio): the up projections (lora_up / peft's lora_B) of "
                                      "lora, locon and dora adapters train at this multiple of their learning rate "
                                      "(16 is the paper's choice); loha and lokr have none. 0 disables it.",
                                      minimum=0.0)
    loraplus_unet_lr_ratio: float = _field(0.0, "LoRA+ ratio of the UNet adapters; 0 means loraplus_lr_ratio.",
                                           minimum=0.0)
    loraplus_text_encoder_lr_ratio: float = _field(0.0, "LoRA+ ratio of the text-encoder adapters; 0 means "
                                                   "loraplus_lr_ratio.", minimum=0.0)
    init_from: str = _field("", "Start from the adapter in this .safetensors file (ours, kohya's or LyCORIS'); "
                            "its type and ranks replace type/rank/alpha above.")


@dataclass
class OptimizerConfig:
    type: str = _field(
        "adamw", "Optimizer (kohya: optimizer_type): adamw, adamw8bit, paged_adamw8bit, lion, lion8bit, prodigy, "
        "adafactor, came, adopt, muon, adamw_schedulefree, or any torch optimizer class by import path (e.g. "
        "'torch.optim.RAdam', 'pytorch_optimizer.Lamb'; built as Class(params, lr=lr, **args)). 8-bit and Lion "
        "ones use bitsandbytes and fall back to AdamW / a PyTorch Lion, with a warning, where it cannot run; "
        "came, adopt, muon and adamw_schedulefree need the 'optimizers' extra.")
    args: list[str] = _field([], "Extra optimizer arguments as key=value (kohya: optimizer_args), values in TOML "
                             "syntax, e.g. ['d_coef=2', 'betas=[0.9, 0.99]'].")
    lr: float = _field(1e-4, "Learning rate of the UNet adapters (kohya: unet_lr).", minimum=0.0,
                       exclusive_min=True)
    text_encoder_lr: float = _field(0.0, "Learning rate of the text-encoder adapters; 0 means the same as lr.",
                                    minimum=0.0)
    weight_decay: float = _field(1e-2, "Decoupled weight decay.", minimum=0.0)
    beta1: float = _field(0.9, "Adam beta1.", minimum=0.0, maximum=1.0)
    beta2: float = _field(0.999, "Adam beta2.", minimum=0.0, maximum=1.0)
    eps: float = _field(1e-8, "Adam epsilon.", minimum=0.0, exclusive_min=True)
    max_grad_norm: float = _field(1.0, "Clip the gradient norm to this value; 0 disables clipping.",
                                  minimum=0.0)


@dataclass
class SchedulerConfig:
    type: Literal["constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear",
                  "polynomial"] = _field("constant", "Learning-rate schedule (kohya: lr_scheduler).")
    warmup_steps: int = _field(0, "Linear warm-up steps.", minimum=0)
    num_cycles: int = _field(1, "Restarts for cosine_with_restarts.", minimum=1)
    power: float = _field(1.0, "Exponent of the polynomial schedule.", minimum=0.0, exclusive_min=True)


@dataclass
class TrainingConfig:
    seed: int = _field(42, "Global seed; each rank derives its own stream from it.", minimum=0)
    batch_size: int = _field(4, "Samples per rank per micro-step.", minimum=1)
    gradient_accumulation_steps: int = _field(1, "Micro-steps per optimizer step.", minimum=1)
    max_steps: int = _field(0, "Stop after this many optimizer steps; 0 trains for `epochs`.", minimum=0)
    epochs: int = _field(1, "Epochs over the data when max_steps is 0.", minimum=1)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = _field(
        "auto", "Autocast precision of the forward pass; frozen weights are loaded in it too. auto: bf16 on GPUs "
        "that support it, fp16 (with loss scaling) on older CUDA GPUs, no (fp32) on CPU/MPS. Adapters and "
        "their optimizer state stay fp32 whatever this says; TF32 is allowed for fp32 work on CUDA.")
    gradient_checkpointing: bool = _field(False, "Recompute activations in the backward pass to save memory.")
    attention: Literal["sdpa", "xformers"] = _field(
        "sdpa", "Attention kernel: PyTorch scaled_dot_product_attention, or xformers (CUDA, package installed).")
    attention_fallback: bool = _field(False, "When xformers cannot run here: false stops with an error, true "
                                      "warns and uses SDPA.")
    vae_fp32: bool = _field(True, "Keep the VAE in fp32 whatever mixed_precision says (SDXL's VAE overflows to "
                            "NaN in fp16).")
    max_consecutive_skips: int = _field(10, "Stop with a diagnostic after this many optimizer steps in a row "
                                        "skipped for a non-finite loss or gradient.", minimum=1)
    noise_offset: float = _field(0.0, "Add this much per-channel constant noise (brightens/darkens range).",
                                 minimum=0.0)
    prior_loss_weight: float = _field(1.0, "Loss weight of regularization images (prepare --reg; kohya: "
                                      "prior_loss_weight).", minimum=0.0)
    masked_loss: bool = _field(True, "Weight each pixel's loss by the sample's mask where the data holds one "
                               "(prepare --alpha-mask / --mask-dir; kohya: masked_loss, alpha_mask), the mask "
                               "area-resized to the latent grid; false ignores the masks.")
    min_snr_gamma: float = _field(0.0, "Min-SNR loss weighting gamma (5 is common); 0 disables it.",
                                  minimum=0.0)
    scale_weight_norms: float = _field(0.0, "After each optimizer step, shrink every adapter whose update (delta "
                                       "weight) norm exceeds this to this norm; the count is logged as "
                                       "keys_scaled (kohya: scale_weight_norms, 1 is common). 0 disables it.",
                                       minimum=0.0)
    noise_offset_random_strength: bool = _field(False, "Scale noise_offset by a uniform draw in [0, 1) per sample "
                                                "(kohya: noise_offset_random_strength, a draw per batch).")
    adaptive_noise_scale: float = _field(0.0, "Add this times |the latent's channel mean| to noise_offset, per "
                                         "sample and channel, clamped at 0 (kohya: adaptive_noise_scale; needs "
                                         "noise_offset); 0 disables it.")
    multires_noise_iterations: int = _field(0, "Pyramid (multi-resolution) noise: add this many levels of "
                                            "upsampled coarser noise, then rescale to unit variance per sample "
                                            "(kohya: multires_noise_iterations, 6-10 is common); 0 disables it.",
                                            minimum=0)
    multires_noise_discount: float = _field(0.3, "Weight ratio of each coarser pyramid level (kohya: "
                                            "multires_noise_discount).", minimum=0.0, maximum=1.0)
    ip_noise_gamma: float = _field(0.0, "Input perturbation: the UNet input is noised with noise + gamma * another "
                                   "draw while the target keeps the noise (kohya: ip_noise_gamma, 0.1 is common); "
                                   "0 disables it.", minimum=0.0)
    ip_noise_gamma_random_strength: bool = _field(False, "Scale ip_noise_gamma by a uniform draw in [0, 1) per "
                                                  "sample (kohya: ip_noise_gamma_random_strength, per batch).")
    min_timestep: int = _field(0, "Smallest training timestep drawn (kohya: min_timestep).", minimum=0,
                               maximum=999)
    max_timestep: int = _field(1000, "Timesteps are drawn below this (kohya: max_timestep); equal to min_timestep: "
                               "always that timestep.", minimum=1, maximum=1000)
    zero_terminal_snr: bool = _field(False, "Rescale the noise schedule's betas so the last timestep has zero "
                                     "SNR (Lin et al. 2023; kohya: zero_terminal_snr); needs a v_prediction "
                                     "model or model.prediction_type = 'v_prediction'.")
    loss_type: Literal["l2", "l1", "huber", "smooth_l1"] = _field(
        "l2", "Per-element loss (kohya: loss_type): l2 (squared error), l1, huber = 2c(sqrt(d^2 + c^2) - c), "
        "smooth_l1 = 2(sqrt(d^2 + c^2) - c), with c from huber_schedule.")
    huber_schedule: Literal["constant", "exponential", "snr"] = _field(
        "snr", "The c of huber / smooth_l1 per timestep t (kohya: huber_schedule): constant c = huber_c * "
        "huber_scale; exponential c = huber_scale * huber_c^(t/T); snr c = (1 - huber_c) / (1 + sigma_t)^2 + "
        "huber_c with sigma_t = sqrt((1 - a_t) / a_t).")
    huber_c: float = _field(0.1, "Huber parameter (kohya: huber_c).", minimum=0.0, exclusive_min=True)
    huber_scale: float = _field(1.0, "Scale of the constant and exponential Huber schedules (kohya: huber_scale).",
                                minimum=0.0, exclusive_min=True)
    debiased_estimation: bool = _field(False, "Weight each sample's loss by 1/sqrt(SNR) (epsilon) or 1/(SNR + 1) "
                                       "(v_prediction), SNR capped at 1000 (kohya: debiased_estimation_loss).")
    scale_v_pred_loss_like_noise_pred: bool = _field(
        False, "Weight a v_prediction loss by SNR/(SNR + 1), SNR capped at 1000, so it scales like an epsilon loss "
        "(kohya: scale_v_pred_loss_like_noise_pred); v_prediction models only.")
    v_pred_like_loss: float = _field(
        0.0, "Add this times the loss divided by SNR/(SNR + 1), SNR capped at 1000, to each sample's loss: a "
        "v-prediction-like term for an epsilon model (kohya: v_pred_like_loss, 0.1 to 0.3 are used); 0 disables "
        "it.", minimum=0.0)


@dataclass
class CheckpointConfig:
    every_steps: int = _field(0, "Write a resumable checkpoint every this many optimizer steps and at the end; "
                              "0 disables checkpoints.", minimum=0)
    keep: int = _field(2, "Complete checkpoints kept; older ones are deleted once a newer one is complete.",
                       minimum=1)
    resume: str = _field("", "Resume from 'latest' (the newest complete checkpoint of output.dir, or a fresh "
                         "start if there is none) or from a checkpoint folder; empty starts fresh.")
    stop_at_step: int = _field(0, "Checkpoint and exit (status 75, as on preemption) after this optimizer step, "
                               "to split a run over several jobs; 0 runs to the end.", minimum=0)


@dataclass
class OutputConfig:
    dir: str = _field("runs/dist_lora", "Run directory: resolved config, metrics and the exported adapter.")
    name: str = _field("dist_lora", "File name (without .safetensors) of the exported adapter "
                       "(kohya: output_name).")
    save_precision: Literal["fp16", "bf16", "fp32"] = _field("fp16", "dtype of the saved adapter tensors.")
    format: Literal["kohya", "diffusers"] = _field(
        "kohya", "Key layout of the adapter file: kohya/LyCORIS (A1111, ComfyUI, kohya, LyCORIS, diffusers) or the "
        "diffusers/peft layout written by diffusers' save_lora_weights.")
    overwrite: bool = _field(False, "Allow writing into a run directory that already holds an adapter.")
    save_every_steps: int = _field(0, "Also write the adapter every this many optimizer steps, as "
                                   "<name>-step00000100.safetensors (kohya: save_every_n_steps); 0: never.", minimum=0)
    save_every_epochs: int = _field(0, "Also write the adapter after every this many epochs, as "
                                    "<name>-000003.safetensors (kohya: save_every_n_epochs); 0: never.", minimum=0)
    save_last_n: int = _field(0, "Keep only the newest this many per-step files and per-epoch files (kohya: "
                              "save_last_n_steps / save_last_n_epochs, counted in files); 0 keeps all.", minimum=0)


@dataclass
class LoggingConfig:
    log_every: int = _field(10, "Write metrics (and reduce the data counters across ranks) every this many "
                            "optimizer steps; skipped steps and the last step are always written.", minimum=1)
    progress_bar: bool = _field(True, "Show a progress bar (loss, lr, speed) on the main process.")
    record_sample_keys: bool = _field(False, "Write sample_keys.jsonl: which rank consumed which sample "
                                      "at which step (for audits and tests).")
    comm_stats: bool = _field(False, "Under DDP, log the gradient bytes all-reduced per optimizer step "
                              "(allreduce_bytes) next to the trainable size (trainable_bytes).")
    wandb_project: str = _field("", "Weights & Biases project to log to; empty disables wandb.")
    tensorboard: bool = _field(True, "Write TensorBoard event files (loss, lr, sample images) into "
                               "<output.dir>/tensorboard.")


@dataclass
class ValidationConfig:
    shards: str = _field("", "Held-out set for validation loss: the val/ folder `dist-lora prepare --val-fraction` "
                         "writes, or a folder prepared separately; empty disables validation.")
    every_steps: int = _field(0, "Evaluate the validation loss every this many optimizer steps (and after the "
                              "last step); 0: only after the last step.", minimum=0)
    batch_size: int = _field(0, "Micro-batch size per rank for validation; 0: training.batch_size.", minimum=0)


@dataclass
class SampleConfig:
    prompts: list[str] = _field([], "Sample prompts, each a line in kohya's prompt format, e.g. 'a dlsks robot --n "
                                "blurry --w 1024 --h 1024 --d 42 --l 7 --s 28 --ss euler_a' (--n negative prompt, "
                                "--w/--h size, --d seed, --l CFG scale, --s steps, --ss sampler).")
    prompt_file: str = _field("", "Prompts from a file (kohya: sample_prompts): .txt, one prompt line each ('#' "
                              "starts a comment line); .toml, [prompt] defaults and [[prompt.subset]] tables; "
                              ".json, a list of prompt lines or tables. Used after sample.prompts.")
    negative_prompt: str = _field("", "Negative prompt of prompts that give none (--n).")
    width: int = _field(0, "Width in pixels of prompts that give none (--w), a multiple of 8; 0: the prepared "
                        "data's resolution.", minimum=0)
    height: int = _field(0, "Height in pixels of prompts that give none (--h), a multiple of 8; 0: the prepared "
                         "data's resolution.", minimum=0)
    cfg_scale: float = _field(7.5, "Classifier-free guidance scale of prompts that give none (--l).", minimum=0.0)
    steps: int = _field(30, "Denoising steps of prompts that give none (--s).", minimum=1, maximum=1000)
    sampler: str = _field("euler_a", "Sampler of prompts that give none (--ss): euler, euler_a, heun, dpm_2, "
                          "dpm_2_a, lms, lms_karras, ddim, ddpm, pndm, dpm++_2m, dpm++_2m_karras, dpm++_2m_sde, "
                          "dpm++_2m_sde_karras, dpm++_sde, dpm++_sde_karras, dpmsingle, unipc; kohya's k_* names "
                          "and A1111's ('Euler a', 'DPM++ 2M Karras') work too.")
    seed: int = _field(-1, "Seed of prompts that give none (--d); -1: training.seed + the prompt's number, the same "
                       "at every round so rounds compare.", minimum=-1)
    every_steps: int = _field(0, "Render the prompts every this many optimizer steps (kohya: "
                              "sample_every_n_steps); 0: not by steps.", minimum=0)
    every_epochs: int = _field(0, "Render the prompts after every this many epochs (kohya: sample_every_n_epochs); "
                               "0: not by epochs.", minimum=0)
    at_start: bool = _field(False, "Render the prompts before the first step: the base model, the reference to "
                            "compare with (kohya: sample_at_first).")
    at_end: bool = _field(True, "Render the prompts after the last step.")


@dataclass
class EmaConfig:
    decay: float = _field(0.0, "Keep an exponential moving average of the adapter weights with this decay "
                          "(0.999 to 0.9999 are common); it warms up as min(decay, (1 + n)/(10 + n)) over the first "
                          "updates, as diffusers' EMAModel. Kept in checkpoints. 0 disables it.", minimum=0.0,
                          maximum=0.999999)
    update_every: int = _field(1, "Update the average every this many optimizer steps.", minimum=1)
    export: bool = _field(False, "Write the averaged weights instead of the trained ones (the run's adapter file "
                          "and its intermediate saves).")
    sample: bool = _field(False, "Render sample images with the averaged weights.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)
