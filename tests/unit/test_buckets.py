"""Bucket sets and placements: properties checked against independent arithmetic over many shapes."""

import math
import random

import pytest

from dist_lora.data.buckets import SD1_BUCKETS, SDXL_BUCKETS, BucketError, BucketSpec, bucket_set, nearest_bucket, place


@pytest.mark.parametrize("spec", [SD1_BUCKETS, SDXL_BUCKETS, BucketSpec.for_base(768, step=64)])
def test_bucket_set_properties(spec: BucketSpec) -> None:
    buckets = bucket_set(spec)
    assert len(buckets) == len(set(buckets)) > 5
    for b in buckets:
        assert b.width % 64 == 0 and b.height % 64 == 0
        assert spec.min_side <= b.width <= spec.max_side and spec.min_side <= b.height <= spec.max_side
        assert b.width * b.height <= spec.max_area
    # Symmetric, and the square bucket is the full base area.
    names = {(b.width, b.height) for b in buckets}
    assert all((h, w) in names for w, h in names)
    assert (spec.resolution, spec.resolution) in names


def test_sdxl_set_holds_the_sdxl_training_buckets() -> None:
    names = {b.name for b in bucket_set(SDXL_BUCKETS)}
    for name in ("1024x1024", "1152x896", "896x1152", "1216x832", "832x1216", "1344x768", "768x1344",
                 "1536x640", "640x1536"):
        assert name in names
    assert {"512x512", "576x448", "448x576", "640x384", "768x320"} <= {b.name for b in bucket_set(SD1_BUCKETS)}


@pytest.mark.parametrize(("spec", "max_error"), [(SD1_BUCKETS, 0.16), (SDXL_BUCKETS, 0.08)])
def test_nearest_bucket_aspect_error_is_bounded(spec: BucketSpec, max_error: float) -> None:
    buckets = bucket_set(spec)
    logs = sorted(math.log(b.aspect) for b in buckets)
    half_gap = max(b - a for a, b in zip(logs, logs[1:], strict=False)) / 2
    # Worst log-aspect error: 0.16 (17%) at SD 1.x's extreme 1:4 shapes, 0.08 (8%) for SDXL.
    assert half_gap < max_error
    rng = random.Random(0)
    for _ in range(3000):
        width, height = rng.randint(200, 6000), rng.randint(200, 6000)
        target = math.log(width / height)
        bucket = nearest_bucket(width, height, buckets)
        error = abs(math.log(bucket.aspect) - target)
        # Independent check: no bucket is closer, and inside the covered range the error is at most half a gap.
        assert error <= min(abs(x - target) for x in logs) + 1e-12
        if logs[0] <= target <= logs[-1]:
            assert error <= half_gap + 1e-12
        placement = place(width, height, bucket)
        rw, rh = placement.resized
        assert rw >= bucket.width and rh >= bucket.height  # covers the bucket: no padding, only a crop
        assert min(rw - bucket.width, rh - bucket.height) <= 1  # scaled no more than needed
        assert abs(rw / rh - width / height) <= 2 / min(rw, rh) * (width / height) + 1e-9  # aspect kept
        top, left = placement.crop_top_left
        assert 0 <= top <= rh - bucket.height and 0 <= left <= rw - bucket.width
        assert abs(top - (rh - bucket.height - top)) <= 1 and abs(left - (rw - bucket.width - left)) <= 1  # centred


def test_bad_bucket_parameters_are_named() -> None:
    with pytest.raises(BucketError, match="min_side 100"):
        BucketSpec.for_base(512, min_side=100)
    with pytest.raises(BucketError, match="min_side 1024 is larger than max_side 512"):
        BucketSpec.for_base(512, min_side=1024, max_side=512)
    with pytest.raises(BucketError, match="max_area"):
        BucketSpec.for_base(512, min_side=512, max_area=1000)
