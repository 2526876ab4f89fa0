"""Trainer overhead against a bare PyTorch loop, and DDP gradient traffic against the adapter size.

    .venv/bin/python benchmarks/step_overhead.py [--steps 60] [--out benchmarks/results/step_overhead_cpu.json]

Both loops run the tiny SDXL pipeline on this machine's device with the same batch size and the same
LoRA: VAE encode, text encode, noise, UNet forward and backward, AdamW step. The bare loop reuses one
pre-decoded batch; the trainer streams, decodes and batches shards, agrees on non-finite checks across
ranks and writes metrics, so the difference is what the framework costs. The DDP part runs 2 processes
(gloo on CPU) with logging.comm_stats and compares the bytes all-reduced per step with the trainable
bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dist_lora.adapters.network import attach_network  # noqa: E402
from dist_lora.config import NetworkConfig, config_from_dict, to_toml  # noqa: E402
from dist_lora.data.prepare import PrepareOptions, prepare_dataset  # noqa: E402
from dist_lora.data.shards import ShardLoader  # noqa: E402
from dist_lora.data.stream import pixels_to_unit_range  # noqa: E402
from dist_lora.data.synthetic import write_shapes_dataset  # noqa: E402
from dist_lora.models.load import load_components  # noqa: E402
from dist_lora.models.text import encode_prompts, tokenize  # noqa: E402
from dist_lora.models.tiny import write_tiny_pipeline  # noqa: E402
from dist_lora.train.diffusion import add_noise, diffusion_loss, training_target  # noqa: E402
from dist_lora.train.trainer import train  # noqa: E402

BATCH = 4
WARMUP = 5


def _raw(model: Path, shards: Path, out: Path, steps: int, **logging: object) -> dict:
    return {"model": {"pretrained": str(model)}, "data": {"shards": str(shards), "num_workers": 1},
            "network": {"rank": 8, "alpha": 8.0}, "training": {"batch_size": BATCH, "max_steps": steps},
            "output": {"dir": str(out), "overwrite": True}, "logging": {"progress_bar": False, **logging}}


def trainer_step_times(model: Path, shards: Path, out: Path, steps: int) -> list[float]:
    result = train(config_from_dict(_raw(model, shards, out, steps)))
    lines = [json.loads(x) for x in result.metrics_path.read_text().splitlines()]
    return [1.0 / x["steps_per_s"] for x in lines][WARMUP:]


def bare_step_times(model: Path, shards: Path, steps: int) -> list[float]:
    c = load_components(str(model))
    for module in [c.vae, c.unet, *c.text_encoders]:
        module.requires_grad_(False)
    attach_network(c.unet, c.text_encoders, c.family, NetworkConfig(rank=8, alpha=8.0))
    params = [p for p in c.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = next(iter(ShardLoader(shards, rank=0, world_size=1, batch_size=BATCH, seed=0, num_workers=0).epoch(0)))
    time_ids = torch.tensor([m["original_size"] + m["crop_top_left"] + m["target_size"] for m in batch.metas],
                            dtype=torch.float32)
    alphas = c.noise_scheduler.alphas_cumprod
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        with torch.no_grad():
            pixels = pixels_to_unit_range(batch.pixels, torch.device("cpu"), torch.float32)
            latents = c.vae.encode(pixels).latent_dist.sample() * c.vae.config.scaling_factor
            hidden, pooled = encode_prompts(c.text_encoders, tokenize(c.tokenizers, batch.captions), c.family)
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (BATCH,))
        prediction = c.unet(add_noise(latents, noise, t, alphas), t, encoder_hidden_states=hidden,
                            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        loss = diffusion_loss(prediction, training_target(latents, noise, t, alphas, "epsilon"))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return times[WARMUP:]


def ddp_traffic(model: Path, shards: Path, out: Path, tmp: Path) -> dict[str, float]:
    raw = _raw(model, shards, out, 8, comm_stats=True)
    raw["training"]["batch_size"] = 2
    recipe = tmp / "ddp.toml"
    recipe.write_text(to_toml(config_from_dict(raw)))
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(REPO / "launch" / "cpu_2proc.yaml"), "-m", "dist_lora.train", "--config", str(recipe)],
                   cwd=REPO, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    per_step = [x["allreduce_bytes"] for x in lines]
    trainable = lines[0]["trainable_bytes"]
    return {"allreduce_bytes_per_step_median": statistics.median(per_step), "trainable_bytes": trainable,
            "ratio": statistics.median(per_step) / trainable}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "step_overhead_cpu.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = write_tiny_pipeline("sdxl", tmp / "model")
        write_shapes_dataset(tmp / "src", images=64, repeats=4)
        prepare_dataset(tmp / "src", tmp / "shards", PrepareOptions(resolution=128, shard_size=16))
        ours = trainer_step_times(model, tmp / "shards", tmp / "run", args.steps)
        bare = bare_step_times(model, tmp / "shards", args.steps)
        traffic = ddp_traffic(model, tmp / "shards", tmp / "ddp", tmp)
    ours_median, bare_median = statistics.median(ours), statistics.median(bare)
    result = {
        "benchmark": "step_overhead",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count()},
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "versions": {m: __import__(m).__version__ for m in ("torch", "diffusers", "accelerate", "peft",
                                                           "transformers", "deepspeed")},
        "setup": {"model": "tiny SDXL (dist-lora tiny-model)", "batch_size": BATCH, "lora_rank": 8,
                  "resolution": 128, "steps_timed": len(ours)},
        "trainer_step_s_median": ours_median,
        "bare_loop_step_s_median": bare_median,
        "overhead_fraction": ours_median / bare_median - 1.0,
        "ddp_2proc": traffic,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
