from pathlib import Path

import pytest

from dist_lora.data.shards import Manifest, ShardDataError, epoch_shard_order, plan_epoch


def _manifest(sizes: list[int]) -> Manifest:
    shards = [{"file": f"s{i}.tar", "samples": n, "samples_with_repeats": n} for i, n in enumerate(sizes)]
    return Manifest(Path("/data"), 64, shards, {})


def test_shard_order_depends_on_seed_and_epoch_only() -> None:
    assert epoch_shard_order(10, 1, 0) == epoch_shard_order(10, 1, 0)
    assert sorted(epoch_shard_order(10, 1, 3)) == list(range(10))
    assert epoch_shard_order(10, 1, 0) != epoch_shard_order(10, 1, 1)


def test_uneven_shards_give_equal_steps_and_count_drops() -> None:
    manifest = _manifest([10, 3, 7, 5, 9])
    plans = [plan_epoch(manifest, seed=0, epoch=0, rank=r, world_size=2, batch_size=2) for r in range(2)]
    assert plans[0].steps == plans[1].steps
    all_shards = sorted(plans[0].shard_indices + plans[1].shard_indices)
    assert all_shards == [0, 1, 2, 3, 4]
    total = sum(p.steps * 2 + p.dropped for p in plans)
    assert total == 34


def test_too_few_shards_is_an_error() -> None:
    with pytest.raises(ShardDataError, match="1 shard.*2 ranks"):
        plan_epoch(_manifest([10]), seed=0, epoch=0, rank=0, world_size=2, batch_size=1)
    with pytest.raises(ShardDataError, match="fewer than batch_size"):
        plan_epoch(_manifest([3]), seed=0, epoch=0, rank=0, world_size=1, batch_size=4)


def test_missing_manifest_is_named(tmp_path: Path) -> None:
    with pytest.raises(ShardDataError, match="has no manifest.json"):
        Manifest.read(tmp_path)
    with pytest.raises(ShardDataError, match="is not a folder"):
        Manifest.read(tmp_path / "nope")
