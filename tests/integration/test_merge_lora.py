"""`dist-lora merge-lora` against independent computations: lycoris-lora's reading of the merged file and
of each input, combined with numpy; per-block weights by kohya's block numbering, restated here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dist_lora.adapters.block_weights import slot_of
from dist_lora.cli import main
from dist_lora.models.load import load_components
from tests.integration.test_lycoris_compat import _adapted, _export, _randomise, modules_by_name
from tests.integration.test_resize import _best, _deltas


@pytest.fixture(scope="module")
def files(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A LoCon, a LoHa and a LoKr file with different random adapters, and a DoRA and an SDXL one."""
    root = tmp_path_factory.mktemp("merge_sources")
    out = {}
    for seed, (arch, kind) in enumerate([("sd15", "locon"), ("sd15", "loha"), ("sd15", "lokr"), ("sd15", "dora"),
                                         ("sdxl", "lora")]):
        c = _adapted(arch, kind, tiny_models)
        for i, model in enumerate([c.unet, *c.text_encoders]):
            _randomise(model, seed=100 * seed + i)
        out[kind if arch == "sd15" else "sdxl"] = _export(c, kind, root / f"{kind}_{arch}.safetensors")
    return out


@pytest.fixture(scope="module")
def by_name(tiny_models: dict[str, Path]) -> dict[str, torch.nn.Module]:
    return modules_by_name(load_components(str(tiny_models["sd15"])))


def _weighted_sum(parts: list[tuple[dict[str, np.ndarray], float]], block: dict[str, float] | None = None
                  ) -> dict[str, np.ndarray]:
    total: dict[str, np.ndarray] = {}
    for deltas, weight in parts:
        for name, delta in deltas.items():
            factor = weight * (block or {}).get(name, 1.0)
            total[name] = total.get(name, 0) + factor * delta
    return total


def _run(files: dict[str, Path], out: Path, tiny: Path, *extra: str) -> int:
    return main(["merge-lora", f"{files['locon']}:0.7", f"{files['loha']}:-0.4", f"{files['lokr']}:1.3",
                 "--out", str(out), "--save-precision", "fp32", "--base", str(tiny), *extra])


def test_concat_is_the_weighted_sum_exactly(files: dict[str, Path], by_name: dict[str, torch.nn.Module],
                                            tiny_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "concat.safetensors"
    assert _run(files, out, tiny_models["sd15"], "--mode", "concat") == 0
    want = _weighted_sum([(_deltas(files["locon"], by_name), 0.7), (_deltas(files["loha"], by_name), -0.4),
                          (_deltas(files["lokr"], by_name), 1.3)])
    got = _deltas(out, by_name)
    assert got.keys() == want.keys() and len(want) > 10
    tensors = load_file(str(out))
    locon = load_file(str(files["locon"]))
    for name, delta in want.items():
        np.testing.assert_allclose(got[name], delta, atol=1e-5 * np.abs(delta).max(), err_msg=name)
        if f"{name}.lora_down.weight" in locon:  # ranks add up: the LoCon's own rank is inside
            assert tensors[f"{name}.lora_down.weight"].shape[0] > locon[f"{name}.lora_down.weight"].shape[0]


def test_svd_merge_is_the_truncated_svd_of_the_sum(files: dict[str, Path], by_name: dict[str, torch.nn.Module],
                                                   tiny_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "svd.safetensors"
    assert _run(files, out, tiny_models["sd15"], "--rank", "3", "--conv-rank", "2") == 0
    want = _weighted_sum([(_deltas(files["locon"], by_name), 0.7), (_deltas(files["loha"], by_name), -0.4),
                          (_deltas(files["lokr"], by_name), 1.3)])
    got = _deltas(out, by_name)
    for name, delta in want.items():
        rank = 2 if delta.ndim == 4 and delta.shape[2] > 1 else 3
        np.testing.assert_allclose(got[name], _best(delta, rank), atol=1e-5 * np.abs(delta).max(), err_msg=name)
    with safe_open(str(out), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["ss_network_dim"] == "Dynamic" or meta["ss_network_dim"] in ("2", "3")
    assert [m["weight"] for m in json.loads(meta["dist_lora_merged_from"])] == [0.7, -0.4, 1.3]
    assert meta["ss_base_model_version"] == "sd_v1"


def _kohya_sd_block(name: str) -> int:
    """kohya's get_lbw_block_index for SD 1.x, restated."""
    if "text_model_encoder_" in name:
        return 0
    m = re.search(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_", name)
    if m:
        i, j = int(m[2]), int(m[4])
        if m[1] == "down":
            return 1 + (3 * i + j + 1 if m[3] in ("resnets", "attentions") else 3 * (i + 1))
        return 14 + (3 * i + j if m[3] in ("resnets", "attentions") else 3 * i + 2)
    return 13 if "mid_block_" in name else -1


def test_block_weights_scale_each_files_blocks(files: dict[str, Path], by_name: dict[str, torch.nn.Module],
                                               tiny_models: dict[str, Path], tmp_path: Path) -> None:
    # 17 weights: BASE, IN01, IN02, IN04, IN05, IN07, IN08, MID, OUT03-OUT11 (the extension's SD 1.x list).
    lbw = [0.5, 0, 0.25, 1, 1, 1, 1, 2, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    slots = [0, 2, 3, 5, 6, 8, 9, 13, *range(17, 26)]
    out = tmp_path / "lbw.safetensors"
    assert main(["merge-lora", f"{files['locon']}:0.7", f"{files['loha']}:1.0", "--out", str(out), "--mode",
                 "concat", "--save-precision", "fp32", "--base", str(tiny_models["sd15"]),
                 "--lbws", json.dumps(lbw), "[" + ",".join(["1"] * 17) + "]"]) == 0
    locon = _deltas(files["locon"], by_name)
    weight_of_slot = dict(zip(slots, lbw, strict=True))
    block = {name: weight_of_slot.get(_kohya_sd_block(name), 1.0) for name in locon}
    assert {block[n] for n in block} >= {0.0, 0.5, 2.0}, "the test would not see the block weights"
    want = _weighted_sum([(locon, 0.7)], block)
    want = _weighted_sum([(want, 1.0), (_deltas(files["loha"], by_name), 1.0)])
    got = _deltas(out, by_name)
    for name, delta in want.items():
        np.testing.assert_allclose(got[name], delta, atol=1e-5 * np.abs(delta).max(), err_msg=name)
    assert all(slot_of(name, "sd1") == _kohya_sd_block(name) for name in locon)


def test_sdxl_block_slots_follow_kohya() -> None:
    # kohya: time_embed/label_emb 1, input_blocks_N 1+N, middle_block 13, output_blocks_N 14+N, out 23.
    cases = {"lora_unet_input_blocks_4_1_proj_in": 5, "lora_unet_middle_block_1_proj_out": 13,
             "lora_unet_output_blocks_2_1_transformer_blocks_0_attn1_to_q": 16, "lora_unet_time_embed_0": 1,
             "lora_unet_out_2": 23, "lora_te2_text_model_encoder_layers_3_mlp_fc1": 0}
    assert {k: slot_of(k, "sdxl") for k in cases} == cases


@pytest.mark.parametrize("args,message", [
    (["{locon}:0.5", "{sdxl}:0.5", "--rank", "2"], "different base models"),
    (["{locon}:0.5", "{dora}:0.5", "--rank", "2"], "is DoRA"),
    (["{locon}:0.5", "{loha}:0.5"], "--mode svd needs --rank"),
    (["{locon}:0.5", "{loha}:0.5", "--mode", "concat", "--rank", "4"], "keeps every file's rank"),
    (["{locon}:0.5", "{loha}:x", "--rank", "2"], "must be a number"),
    (["{locon}", "{loha}", "--rank", "2", "--lbws", "[1,1]"], "one per file"),
    (["{locon}", "{loha}", "--rank", "2", "--lbws", "[1,1]", "[1,1]"], "has 2 weights"),
    (["{locon}", "--rank", "2"], "at least two"),
])
def test_bad_inputs_are_refused_naming_what_is_wrong(args: list[str], message: str, files: dict[str, Path],
                                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.safetensors"
    filled = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    assert main(["merge-lora", *filled, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err and not out.exists()
