"""The adapter file's hashes and modelspec fields, computed the way kohya's sd-scripts computes them."""

from __future__ import annotations

import hashlib
from io import BytesIO

import pytest
import torch
from safetensors.torch import save

from dist_lora.adapters.kohya import ExportInfo, build_metadata


def _kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """sd-scripts' precalculate_safetensors_hashes / addnet_hash_safetensors / addnet_hash_legacy."""
    b = BytesIO(save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")}))
    b.seek(0)
    n = int.from_bytes(b.read(8), "little")
    b.seek(n + 8)
    model = hashlib.sha256(b.read()).hexdigest()
    b.seek(0x100000)
    legacy = hashlib.sha256(b.read(0x10000)).hexdigest()[0:8]
    return model, legacy


@pytest.mark.parametrize(("family", "implementation"), [
    ("sd1", "diffusers"), ("sd2", "diffusers"), ("sdxl", "https://github.com/Stability-AI/generative-models")])
def test_hashes_and_modelspec_as_kohya_writes_them(family: str, implementation: str) -> None:
    g = torch.Generator().manual_seed(0)
    # Over 1 MiB + 64 KiB, so the legacy hash reads tensor bytes whose offset the header's length sets.
    tensors = {f"lora_unet_block_{i}.lora_down.weight": torch.randn(64, 1280, generator=g).half() for i in range(8)}
    tensors |= {f"lora_unet_block_{i}.alpha": torch.tensor(2.0) for i in range(8)}
    info = ExportInfo(family, "epsilon", "my_lora", 64, 2.0, 1024, {"1_x": {"x": 3}},
                      {"ss_steps": "100", "modelspec.date": "2026-01-01T00:00:00"})
    meta = build_metadata(info, tensors)
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == _kohya_hashes(tensors, meta)
    # The ss_* header moves the bytes the legacy hash reads: without it the hash would differ.
    assert meta["sshs_legacy_hash"] != hashlib.sha256(save(tensors)[0x100000:0x110000]).hexdigest()[:8]
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.implementation"] == implementation
    assert meta["modelspec.implementation_version"].startswith("dist_lora/")
