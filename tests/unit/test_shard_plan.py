"""Epoch planning and the shard loader: equal steps, every sample once, bad data, shard URLs."""

import io
import json
import logging
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dist_lora.data.captions import CaptionPolicy, CaptionTransform
from dist_lora.data.manifest import Manifest, ShardDataError
from dist_lora.data.shards import (
    ShardLoader,
    assign_shards,
    epoch_shard_order,
    plan_epoch,
)
from dist_lora.data.stream import TENSOR_FIELDS, pack_chunk, unpack_chunk
from dist_lora.data.tar_samples import BadData
from tests.conftest import expected_sample_keys


def _manifest(sizes: list[int], buckets: list[list[int]] | None = None) -> Manifest:
    shards = [{"file": f"s{i}.tar", "samples": n, "samples_with_repeats": n,
               "bucket": (buckets[i] if buckets else [64, 64])} for i, n in enumerate(sizes)]
    return Manifest(Path("/data"), 64, shards, {})


def test_shard_order_depends_on_seed_and_epoch_only() -> None:
    assert epoch_shard_order(10, 1, 0) == epoch_shard_order(10, 1, 0)
    assert sorted(epoch_shard_order(10, 1, 3)) == list(range(10))
    assert epoch_shard_order(10, 1, 0) != epoch_shard_order(10, 1, 1)


def test_uneven_shards_give_equal_steps_and_count_padding() -> None:
    manifest = _manifest([10, 3, 7, 5, 9], [[64, 64], [64, 64], [128, 64], [64, 64], [128, 64]])
    plans = [plan_epoch(manifest, seed=0, epoch=0, rank=r, world_size=2, batch_size=2) for r in range(2)]
    assert plans[0].steps == plans[1].steps
    assert sorted(plans[0].shard_indices + plans[1].shard_indices) == [0, 1, 2, 3, 4]
    assert sum(p.samples for p in plans) == 34  # nothing dropped
    for p in plans:  # steps * batch = real + padding, on every rank
        assert p.steps * 2 == p.samples + p.padded and p.padded >= 0
    # Balanced by size: the two ranks' sample counts differ by at most the smallest shard.
    assert abs(plans[0].samples - plans[1].samples) <= 3
    # Accumulation: steps rounded up to a multiple.
    assert plan_epoch(manifest, seed=0, epoch=0, rank=0, world_size=2, batch_size=2, multiple_of=4).steps % 4 == 0


def test_assignment_is_a_partition_for_many_layouts() -> None:
    for world in (1, 2, 3, 8):
        for epoch in range(5):
            manifest = _manifest([(i * 7919 + epoch) % 13 + 1 for i in range(17)])
            assigned = assign_shards(manifest, 0, epoch, world)
            assert sorted(i for shards in assigned for i in shards) == list(range(17))
            order = epoch_shard_order(17, 0, epoch)
            for shards in assigned:  # each rank reads its shards in the epoch's order
                assert shards == sorted(shards, key=order.index)


def _linear_scan_assignment(manifest: Manifest, seed: int, epoch: int, world: int,
                            sizes: list[int]) -> list[list[int]]:
    """The greedy rule restated as first written (a linear scan for the least-loaded rank per shard)."""
    order = epoch_shard_order(len(manifest.shards), seed, epoch)
    position = {shard: i for i, shard in enumerate(order)}
    loads, assigned = [0] * world, [[] for _ in range(world)]  # type: list[int], list[list[int]]
    for shard in sorted((i for i in order if sizes[i] > 0), key=lambda i: (-sizes[i], position[i])):
        rank = min(range(world), key=lambda r: (loads[r], len(assigned[r]), r))
        assigned[rank].append(shard)
        loads[rank] += sizes[shard]
    return [sorted(shards, key=position.__getitem__) for shards in assigned]


@pytest.mark.parametrize("world", [1, 2, 3, 8, 64, 513])
def test_heap_assignment_equals_the_linear_scan(world: int) -> None:
    """Equal sizes (all ties), a few sizes (many ties), spread sizes, emptied shards (a resume), and sizes where
    two ranks tie on load with different shard counts (the second tie-break)."""
    count_tie = [6, 5, 5, 6, 1, 1, 1, 6, 2, 5, 5, 1]
    for pattern in range(5):
        sizes = [[1000] * 700, [(i % 3 + 1) * 10 for i in range(700)], [(i * 7919) % 997 + 1 for i in range(700)],
                 [0 if i % 5 == 0 else (i * 31) % 40 for i in range(700)], count_tie][pattern]
        manifest = _manifest([max(n, 1) for n in sizes])
        for epoch in (0, 3):
            assert assign_shards(manifest, 7, epoch, world, sizes) == \
                _linear_scan_assignment(manifest, 7, epoch, world, sizes)


def test_too_few_shards_is_an_error() -> None:
    with pytest.raises(ShardDataError, match=r"1 shard\(s\) but 2 rank\(s\) x 1 worker\(s\)"):
        plan_epoch(_manifest([10]), seed=0, epoch=0, rank=0, world_size=2, batch_size=1)
    with pytest.raises(ShardDataError, match=r"3 shard\(s\) but 2 rank\(s\) x 2 worker\(s\) = 4 readers"):
        plan_epoch(_manifest([10, 10, 10]), seed=0, epoch=0, rank=0, world_size=2, batch_size=1, num_workers=2)


def test_missing_manifest_is_named(tmp_path: Path) -> None:
    with pytest.raises(ShardDataError, match="has no manifest.json"):
        Manifest.read(tmp_path)
    with pytest.raises(ShardDataError, match="is not a folder"):
        Manifest.read(tmp_path / "nope")


def test_two_ranks_two_workers_see_every_sample_once(uneven_shards: Path) -> None:
    manifest = json.loads((uneven_shards / "manifest.json").read_text())
    assert sorted(s["samples"] for s in manifest["shards"]) == [1, 3, 4, 4, 4]
    for epoch in range(3):
        seen: Counter[str] = Counter()
        steps = []
        for rank in range(2):
            loader = ShardLoader(uneven_shards, rank=rank, world_size=2, batch_size=3, seed=5, num_workers=2,
                                 shuffle_buffer=4)
            batches = list(loader.epoch(epoch))
            steps.append(len(batches))
            for batch in batches:
                assert batch.pixels is not None and len({tuple(batch.pixels.shape[1:])}) == 1  # one bucket
                assert batch.weights.tolist() == [0.0 if k.startswith("pad:") else 1.0 for k in batch.keys]
                seen.update(batch.real_keys)
            plan = loader.plan(epoch)
            assert loader.stats.padded_samples == plan.padded
        assert steps[0] == steps[1]
        assert seen == expected_sample_keys(uneven_shards)  # 27 samples with repeats, each exactly once


def test_damaged_shards_are_skipped_counted_and_logged_once(uneven_shards: Path, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(uneven_shards, damaged)
    manifest = json.loads((damaged / "manifest.json").read_text())
    first = damaged / manifest["shards"][0]["file"]
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])  # a truncated tar
    second = damaged / manifest["shards"][1]["file"]
    with tarfile.open(second) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    broken_key = members[0][0].name.split(".")[0]
    with tarfile.open(second, "w") as tar:
        for member, data in members:
            if member.name.endswith((".png", ".jpg")) and member.name.startswith(broken_key + "."):
                data = b"garbage"
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    caplog.set_level(logging.WARNING, logger="dist_lora.data.shards")
    loader = ShardLoader(damaged, rank=0, world_size=1, batch_size=2, seed=0, num_workers=2)
    for epoch in range(2):
        batches = list(loader.epoch(epoch))
        assert len(batches) == loader.plan(epoch).steps  # the step count never changes
    repeats = int(json.loads(dict((m.name, d) for m, d in members)[f"{broken_key}.json"])["repeats"])
    # Per epoch: one record for the truncated shard, one per repeat of the broken member.
    assert loader.stats.bad_records == 2 * (1 + repeats)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2  # each damaged place logged once over both epochs
    assert any(manifest["shards"][0]["file"] in w and "damaged" in w for w in warnings)
    assert any(manifest["shards"][1]["file"] in w and broken_key in w for w in warnings)


def test_brace_and_pipe_urls_read_the_same_samples(uneven_shards: Path) -> None:
    n = len(json.loads((uneven_shards / "manifest.json").read_text())["shards"])
    local = ShardLoader(uneven_shards, rank=0, world_size=1, batch_size=2, seed=1, num_workers=0)
    want = [b.keys for b in local.epoch(0)]
    brace = f"{uneven_shards}/train-{{000000..{n - 1:06d}}}.tar"
    for pattern in (brace, f"pipe:cat {brace}"):
        loader = ShardLoader(uneven_shards, rank=0, world_size=1, batch_size=2, seed=1, num_workers=0,
                             shard_urls=pattern)
        assert [b.keys for b in loader.epoch(0)] == want
    with pytest.raises(ShardDataError, match="expands to 2 URLs"):
        ShardLoader(uneven_shards, rank=0, world_size=1, batch_size=2, seed=1,
                    shard_urls=f"{uneven_shards}/train-{{0..1}}.tar")
    with pytest.raises(ShardDataError, match="does not name shard"):
        ShardLoader(uneven_shards, rank=0, world_size=1, batch_size=2, seed=1,
                    shard_urls=f"{uneven_shards}/x-{{000000..{n - 1:06d}}}.tar")


def test_resume_mid_epoch_decodes_nothing_twice(uneven_shards: Path, tmp_path: Path) -> None:
    """A loader resumed from a saved position yields exactly the rest of the epoch, reading only the shards
    its workers had not finished."""
    import shutil

    from dist_lora.data.position import EpochProgress

    damaged = tmp_path / "damaged"  # one undecodable member, so the resume must also replay bad data
    shutil.copytree(uneven_shards, damaged)
    manifest = json.loads((damaged / "manifest.json").read_text())
    shard = damaged / manifest["shards"][2]["file"]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    with tarfile.open(shard, "w") as tar:
        for i, (member, data) in enumerate(members):
            data = b"broken" if i == 0 else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))

    def loader() -> ShardLoader:
        return ShardLoader(damaged, rank=1, world_size=2, batch_size=2, seed=3, num_workers=2, shuffle_buffer=4,
                           captions=CaptionPolicy(CaptionTransform(shuffle=True)))

    full = list(loader().epoch(1))
    assert len(full) == loader().plan(1).steps
    for stop in (1, 3, len(full) - 1, len(full)):
        first = loader()
        for _ in zip(range(stop), first.epoch(1), strict=False):
            pass
        saved = json.loads(json.dumps(first.progress.to_json()))  # as the checkpoint stores it
        resumed = loader()
        rest = list(resumed.epoch(1, resume=EpochProgress.from_json(saved)))
        assert [b.keys for b in rest] == [b.keys for b in full[stop:]]
        assert [b.captions for b in rest] == [b.captions for b in full[stop:]]
        for got, want in zip(rest, full[stop:], strict=True):
            assert got.pixels is not None and want.pixels is not None and torch.equal(got.pixels, want.pixels)
            assert torch.equal(got.weights, want.weights)
        # Each worker opened only the shard it stopped in and those after it; none it had finished.
        plan, lanes = resumed.plan(1), len(saved["workers"])
        expected_open = sum(len(plan.shard_indices[w::lanes]) - current
                            for w, (current, _, ended) in enumerate(saved["workers"]) if not ended)
        assert resumed.stats.shards_opened == expected_open
        assert resumed.progress.batches == len(full)
    assert len(json.dumps(saved)) < 400  # the position is a few numbers, not the consumed sample keys
    # A position saved under another layout (here: 1 worker instead of 2) is not used for a skip.
    other = ShardLoader(damaged, rank=1, world_size=2, batch_size=2, seed=3, num_workers=1, shuffle_buffer=4)
    saved_progress = EpochProgress.from_json(saved)
    assert not other.can_resume(saved_progress, 1, saved_progress.batches)
    with pytest.raises(ShardDataError, match="not for epoch 1 of this loader"):
        next(iter(other.epoch(1, resume=saved_progress)))


def test_workers_persist_across_epochs_and_read_each_epoch_as_a_fresh_loader(uneven_shards: Path) -> None:
    kept = ShardLoader(uneven_shards, rank=0, world_size=1, batch_size=3, seed=5, num_workers=2, shuffle_buffer=4,
                       captions=CaptionPolicy(CaptionTransform(shuffle=True, tag_dropout=0.3)))
    pids = []
    try:
        for epoch in range(3):
            fresh = ShardLoader(uneven_shards, rank=0, world_size=1, batch_size=3, seed=5, num_workers=2,
                                shuffle_buffer=4,
                                captions=CaptionPolicy(CaptionTransform(shuffle=True, tag_dropout=0.3)))
            want = list(fresh.epoch(epoch))
            fresh.close()
            got = list(kept.epoch(epoch))
            assert [b.keys for b in got] == [b.keys for b in want]
            assert [b.captions for b in got] == [b.captions for b in want]
            assert all(torch.equal(a.pixels, b.pixels) for a, b in zip(got, want, strict=True))  # type: ignore[arg-type]
            pids.append(sorted(w.pid for w in kept._loader._iterator._workers))  # type: ignore[union-attr]
        assert pids[0] == pids[1] == pids[2]
        # A stop mid-epoch (max_steps) leaves the workers able to start the next epoch cleanly.
        partial = kept.epoch(3)
        next(partial)
        fresh = ShardLoader(uneven_shards, rank=0, world_size=1, batch_size=3, seed=5, num_workers=2,
                            shuffle_buffer=4, captions=CaptionPolicy(CaptionTransform(shuffle=True, tag_dropout=0.3)))
        assert [b.keys for b in kept.epoch(4)] == [b.keys for b in fresh.epoch(4)]
        fresh.close()
    finally:
        mailbox = kept._mailbox
        kept.close()
    assert mailbox is not None and not mailbox.path.parent.exists()


def test_packed_chunks_give_back_every_record_in_order() -> None:
    bad = BadData("s0.tar", "k9", "truncated")
    records = [
        {"key": "a", "meta": {"bucket": [64, 32]}, "shard": "s0.tar", "caption": "x",
         "pixels": torch.randint(0, 255, (3, 32, 64), dtype=torch.uint8).permute(0, 2, 1)},  # not contiguous
        {"key": "b", "meta": {}, "shard": "s0.tar", "placeholder": True},
        {"bad": bad},
        {"key": "c", "meta": {}, "shard": "s1.tar", "caption": "y",
         "pixels": torch.randint(0, 255, (3, 16, 16), dtype=torch.uint8),
         "mask": torch.randint(0, 255, (1, 16, 16), dtype=torch.uint8)},
        {"key": "d", "meta": {}, "shard": "s1.tar", "caption": "z", "latent_mean": torch.randn(4, 8, 8),
         "latent_std": torch.rand(4, 8, 8), "hidden": torch.randn(77, 32), "pooled": torch.randn(32)},
    ]
    chunk = pack_chunk(records)
    assert sorted(chunk["tensors"]) == sorted(TENSOR_FIELDS)  # one tensor per name, whatever the records
    back = unpack_chunk(chunk)
    assert len(back) == len(records)
    for got, want in zip(back, records, strict=True):
        assert got.keys() == want.keys()
        for name, value in want.items():
            if isinstance(value, torch.Tensor):
                assert got[name].dtype == value.dtype and torch.equal(got[name], value)
            else:
                assert got[name] == value


def test_worker_hand_off_changes_nothing_in_the_batches(uneven_shards: Path) -> None:
    """One worker reads the same stream as the training process itself: the chunked hand-off must give
    the same batches, bit for bit, in the same order."""
    options = {"rank": 0, "world_size": 1, "batch_size": 3, "seed": 5, "shuffle_buffer": 4,
               "captions": CaptionPolicy(CaptionTransform(shuffle=True, tag_dropout=0.3))}
    inline, worker = ShardLoader(uneven_shards, num_workers=0, **options), ShardLoader(uneven_shards, num_workers=1,
                                                                                        **options)
    try:
        want, got = list(inline.epoch(1)), list(worker.epoch(1))
    finally:
        worker.close()
    assert [b.keys for b in got] == [b.keys for b in want] and len(got) > 3
    assert [b.captions for b in got] == [b.captions for b in want]
    assert all(torch.equal(a.pixels, b.pixels) and torch.equal(a.weights, b.weights)  # type: ignore[arg-type]
               for a, b in zip(got, want, strict=True))


_OPEN_LOADERS: list[ShardLoader] = []


@pytest.fixture(autouse=True)
def _close_loaders() -> Iterator[None]:
    """Worker processes of every loader a test made end with the test, failed or not."""
    yield
    while _OPEN_LOADERS:
        _OPEN_LOADERS.pop().close()


def _layout_loaders(shards: Path, world: int, workers: int, batch: int) -> list[ShardLoader]:
    made = [ShardLoader(shards, rank=r, world_size=world, batch_size=batch, seed=5, num_workers=workers,
                        shuffle_buffer=4) for r in range(world)]
    _OPEN_LOADERS.extend(made)
    return made


def _stop_after(loaders: list[ShardLoader], epoch: int, stop: int, resume: list | None = None,
                seen: Counter[str] | None = None) -> list[dict]:
    """Every rank takes ``stop`` batches; returns the positions a checkpoint would save."""
    for rank, loader in enumerate(loaders):
        for _, batch in zip(range(stop), loader.epoch(epoch, resume=resume[rank] if resume else None), strict=False):
            if seen is not None:
                seen.update(batch.real_keys)
    return [json.loads(json.dumps(loader.progress.to_json())) for loader in loaders]


@pytest.mark.parametrize(("old", "new", "stops"), [
    ((2, 2, 3), (1, 0, 2), (1, 3)),  # fewer ranks, no workers, smaller batches
    ((1, 1, 2), (2, 2, 3), (1, 5)),  # more ranks and workers
    ((1, 0, 3), (4, 0, 2), (3, 8)),  # more ranks than shards with samples left: a rank only pads
])
def test_resume_on_another_layout_uses_every_sample_once(uneven_shards: Path, old: tuple[int, int, int],
                                                         new: tuple[int, int, int], stops: tuple[int, ...]) -> None:
    """A position saved by one layout of ranks, workers and batch size, continued by another: over the
    epoch, every sample (with repeats) exactly once, and equal steps on every new rank."""
    for stop in stops:
        seen: Counter[str] = Counter()
        saved = _stop_after(_layout_loaders(uneven_shards, *old), 1, stop, seen=seen)
        assert sum(seen.values()) > 0
        steps = []
        for loader in _layout_loaders(uneven_shards, *new):
            progress = loader.continuation(saved, 1, stop)
            assert progress is not None and progress.batches == 0 and progress.layout == loader.layout
            batches = list(loader.epoch(1, resume=progress))
            steps.append(len(batches))
            assert len(batches) == loader.plan(1, progress).steps
            for batch in batches:
                seen.update(batch.real_keys)
                assert batch.weights.tolist() == [0.0 if k.startswith("pad:") else 1.0 for k in batch.keys]
        assert len(set(steps)) == 1
        assert seen == expected_sample_keys(uneven_shards)


def test_a_continued_epoch_resumes_exactly_and_moves_on_again(uneven_shards: Path) -> None:
    """Stopped on 2 ranks, continued on 1, stopped again: the same layout resumes that position bit for
    bit; yet another layout (3 ranks) still completes the epoch with every sample once."""
    from dist_lora.data.position import EpochProgress

    seen: Counter[str] = Counter()
    saved = _stop_after(_layout_loaders(uneven_shards, 2, 1, 2), 0, 2, seen=seen)
    single = _layout_loaders(uneven_shards, 1, 1, 2)
    continued = [single[0].continuation(saved, 0, 2)]
    uninterrupted = list(_layout_loaders(uneven_shards, 1, 1, 2)[0].epoch(0, resume=continued[0]))
    again = _stop_after(single, 0, 3, resume=continued, seen=seen)
    same = _layout_loaders(uneven_shards, 1, 1, 2)[0]
    own = same.continuation(again, 0, 3)
    assert own is not None and own.batches == 3
    assert [b.keys for b in same.epoch(0, resume=own)] == [b.keys for b in uninterrupted[3:]]
    for loader in _layout_loaders(uneven_shards, 3, 0, 2):
        progress = loader.continuation(again, 0, 3)
        assert progress is not None
        for batch in loader.epoch(0, resume=progress):
            seen.update(batch.real_keys)
    assert seen == expected_sample_keys(uneven_shards)
    # Positions without a sample position, or of another epoch, replay the epoch (None).
    legacy = [{k: v for k, v in state.items() if k != "workers"} for state in again]
    other = _layout_loaders(uneven_shards, 2, 0, 2)[0]
    assert other.continuation(legacy, 0, 3) is None
    assert other.continuation([EpochProgress(epoch=1, workers=[[0, 1, 0]]).to_json()], 0, 3) is None
