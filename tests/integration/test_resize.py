"""`dist-lora resize` against independent computations: each module's change, as the lycoris-lora package
computes it from the file, compared with numpy's SVD of the original module's change."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dist_lora.adapters.resize import ResizeRule, chosen_rank
from dist_lora.cli import main
from dist_lora.models.load import load_components
from tests.integration.test_lycoris_compat import _adapted, _export, _lycoris_module, modules_by_name

KINDS = ["lora", "locon", "loha", "lokr", "dora"]


def _deltas(path: Path, by_name: dict[str, torch.nn.Module]) -> dict[str, np.ndarray]:
    """Each module's weight change as lycoris-lora computes it from the file."""
    weights = load_file(str(path))
    out = {}
    for name in sorted({k.split(".")[0] for k in weights}):
        orig = by_name[name]
        module = _lycoris_module(weights, name, orig)
        if type(module).__name__ in ("LohaModule", "LokrModule"):
            # Their get_weight is what their forward adds (checked against it); lycoris-lora 4.1's
            # get_diff_weight multiplies by the scale a second time.
            delta = module.get_weight(orig.weight.shape)
        else:
            delta = module.get_diff_weight(shape=orig.weight.shape)[0]
        out[name] = delta.detach().double().numpy()
    return out


def _best(delta: np.ndarray, rank: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(delta.reshape(delta.shape[0], -1), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(delta.shape)


def _is_spatial(delta: np.ndarray) -> bool:
    return delta.ndim == 4 and delta.shape[2] * delta.shape[3] > 1


@pytest.fixture(scope="module")
def files(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("resize_sources")
    return {kind: _export(_adapted("sd15", kind, tiny_models), kind, root / f"{kind}.safetensors") for kind in KINDS}


@pytest.fixture(scope="module")
def by_name(tiny_models: dict[str, Path]) -> dict[str, torch.nn.Module]:
    return modules_by_name(load_components(str(tiny_models["sd15"])))


@pytest.mark.parametrize("kind", KINDS)
def test_full_rank_reproduces_every_module(kind: str, files: dict[str, Path], by_name: dict[str, torch.nn.Module],
                                           tiny_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "full.safetensors"
    assert main(["resize", str(files[kind]), str(out), "--rank", "100000", "--save-precision", "fp32",
                 "--base", str(tiny_models["sd15"])]) == 0
    want, got = _deltas(files[kind], by_name), _deltas(out, by_name)
    assert got.keys() == want.keys() and len(want) > 10
    for name in want:
        assert np.abs(want[name]).max() > 1e-3, name
        np.testing.assert_allclose(got[name], want[name], atol=1e-5 * np.abs(want[name]).max(), err_msg=name)
    tensors = load_file(str(out))
    assert not any(k.endswith(("hada_w1_a", "lokr_w1")) for k in tensors)  # written as LoRA
    if kind == "dora":
        source = load_file(str(files[kind]))
        scales = [k for k in source if k.endswith("dora_scale")]
        assert scales and all(torch.equal(tensors[k], source[k]) for k in scales)


@pytest.mark.parametrize("kind", KINDS[:4])
def test_rank_r_is_the_best_rank_r_approximation(kind: str, files: dict[str, Path],
                                                 by_name: dict[str, torch.nn.Module], tiny_models: dict[str, Path],
                                                 tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r2.safetensors"
    assert main(["resize", str(files[kind]), str(out), "--rank", "2", "--conv-rank", "1", "--save-precision",
                 "fp32", "--verbose", "--base", str(tiny_models["sd15"])]) == 0
    want, got = _deltas(files[kind], by_name), _deltas(out, by_name)
    tensors = load_file(str(out))
    for name, delta in want.items():
        rank = 1 if _is_spatial(delta) else 2
        assert tensors[f"{name}.lora_down.weight"].shape[0] == min(rank, np.linalg.matrix_rank(
            delta.reshape(delta.shape[0], -1), tol=1e-9 * np.abs(delta).max()))
        np.testing.assert_allclose(got[name], _best(delta, rank), atol=1e-5 * np.abs(delta).max(), err_msg=name)
    printed = capsys.readouterr().out
    assert "fro retained" in printed and "average Frobenius norm retention" in printed
    with safe_open(str(out), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["ss_network_dim"] == "2" and "resized from" in meta["ss_training_comment"]
    assert json.loads(meta["dist_lora_resize"])["module_ranks"].keys() == want.keys()
    if kind in ("loha", "lokr"):
        assert meta["ss_network_module"] == "networks.lora" and "ss_network_args" not in meta


@pytest.mark.parametrize("method,param", [("sv_ratio", 4.0), ("sv_fro", 0.9), ("sv_cumulative", 0.7)])
def test_dynamic_methods_choose_kohyas_ranks(method: str, param: float, files: dict[str, Path],
                                             by_name: dict[str, torch.nn.Module], tiny_models: dict[str, Path],
                                             tmp_path: Path) -> None:
    out = tmp_path / "dynamic.safetensors"
    assert main(["resize", str(files["loha"]), str(out), "--rank", "12", "--dynamic", method, "--dynamic-param",
                 str(param), "--save-precision", "fp32", "--base", str(tiny_models["sd15"])]) == 0
    tensors = load_file(str(out))
    ranks_seen = set()
    for name, delta in _deltas(files["loha"], by_name).items():
        s = np.linalg.svd(delta.reshape(delta.shape[0], -1), compute_uv=False)
        # kohya's rules, restated: ratio keeps s > s0/param; fro and cumulative the first index where the
        # share of squares (resp. values) reaches param^2 (resp. param), plus one; at most --rank.
        if method == "sv_ratio":
            rank = int(np.sum(s > s[0] / param))
        else:
            values = s**2 if method == "sv_fro" else s
            target = param**2 if method == "sv_fro" else param
            share = np.cumsum(values) / values.sum()
            rank = min(int(np.searchsorted(share, target)), len(s) - 1) + 1
        rank = max(1, min(rank, 12))
        assert tensors[f"{name}.lora_down.weight"].shape[0] == rank, name
        ranks_seen.add(rank)
    assert len(ranks_seen) > 1, "every module got the same rank; the test would not tell the rules apart"
    with safe_open(str(out), framework="pt") as handle:
        assert handle.metadata()["ss_network_dim"] == "Dynamic"


def test_zero_module_gets_rank_one() -> None:
    assert chosen_rank(torch.zeros(4, dtype=torch.float64), ResizeRule(8, 8, "sv_ratio", 2.0), 8) == 1


@pytest.mark.parametrize("args,message", [
    (["--rank", "0"], "ranks are whole numbers"),
    (["--rank", "4", "--dynamic", "sv_fro"], "needs --dynamic-param"),
    (["--rank", "4", "--dynamic", "sv_fro", "--dynamic-param", "1.5"], "in (0, 1]"),
    (["--rank", "4", "--dynamic-param", "0.5"], "needs --dynamic"),
])
def test_bad_arguments_are_refused_before_anything_is_written(args: list[str], message: str, files: dict[str, Path],
                                                              tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                              ) -> None:
    out = tmp_path / "out.safetensors"
    assert main(["resize", str(files["lora"]), str(out), *args]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_bad_files_are_named(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["resize", str(tmp_path / "missing.safetensors"), str(tmp_path / "o.safetensors"), "--rank", "2"]) == 2
    assert "missing.safetensors' does not exist" in capsys.readouterr().err
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"x")
    assert main(["resize", str(files["lora"]), str(existing), "--rank", "2"]) == 2
    assert "already exists" in capsys.readouterr().err and existing.read_bytes() == b"x"
    # A tiny UNet's flattened LoHa convolution has no counterpart in SD 1.5's published UNet.
    out = tmp_path / "loha.safetensors"
    assert main(["resize", str(files["loha"]), str(out), "--rank", "2"]) == 2
    err = capsys.readouterr().err
    assert "loha.safetensors': module 'lora_unet_" in err and "pass --base" in err and not out.exists()
