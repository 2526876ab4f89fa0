import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from dist_lora.data.buckets import Bucket
from dist_lora.data.encode import resize_and_crop
from dist_lora.data.kohya import DatasetFolderError
from dist_lora.data.prepare import PrepareOptions, prepare_dataset


def _png(path: Path, size: tuple[int, int], mode: str = "RGB", colour: object = (10, 20, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


def _members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def test_kohya_folder_to_shards(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _png(src / "3_robot" / "a.png", (200, 100))
    (src / "3_robot" / "a.txt").write_text("robot, standing")
    _png(src / "3_robot" / "sub dir" / "b.jpg.png", (64, 64))  # dots and spaces in names
    _png(src / "1_ロボット" / "画像.png", (128, 256), mode="RGBA", colour=(0, 0, 0, 0))  # transparent
    (src / "notes").mkdir()
    (src / "1_broken").mkdir()
    (src / "1_broken" / "bad.png").write_bytes(b"not a png")
    report = prepare_dataset(src, tmp_path / "out", PrepareOptions(resolution=64, trigger="zkw", shard_size=2,
                                                                  buckets=False))
    assert (report.found, report.accepted, len(report.rejected)) == (4, 3, 1)
    assert report.rejected[0]["path"] == "1_broken/bad.png"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["samples"] for s in manifest["shards"]] == [2, 1]
    assert manifest["num_samples_with_repeats"] == 1 + 3 + 3
    samples: dict[str, dict[str, bytes]] = {}
    for shard in manifest["shards"]:
        for name, data in _members(tmp_path / "out" / shard["file"]).items():
            key, ext = name.split(".", 1)
            samples.setdefault(key, {})[ext] = data
    assert set(samples) == {"1_ロボット/画像", "3_robot/a", "3_robot/sub dir/b_jpg"}
    a = samples["3_robot/a"]
    assert a["txt"].decode() == "zkw, robot, standing"
    meta = json.loads(a["json"])
    assert meta["original_size"] == [100, 200] and meta["crop_top_left"] == [0, 32] and meta["repeats"] == 3
    assert Image.open(io.BytesIO(a["png"])).size == (64, 64)
    # No caption file: the folder's class name; transparent pixels composited on white.
    jp = samples["1_ロボット/画像"]
    assert jp["txt"].decode() == "zkw, ロボット"
    assert Image.open(io.BytesIO(jp["png"])).getpixel((5, 5)) == (255, 255, 255)
    assert manifest["tag_frequency"]["3_robot"]["zkw"] == 2


def test_resize_and_crop_keeps_centre() -> None:
    image = Image.new("RGB", (300, 100))
    cropped, (top, left) = resize_and_crop(image, Bucket(64, 64))
    assert cropped.size == (64, 64) and (top, left) == (0, 64)
    cropped, (top, left) = resize_and_crop(Image.new("RGB", (100, 300)), Bucket(64, 128))
    assert cropped.size == (64, 128) and (top, left) == (32, 0)


@pytest.mark.parametrize("layout", ["missing", "empty", "no_concepts", "no_images"])
def test_bad_source_folders(tmp_path: Path, layout: str) -> None:
    src = tmp_path / "src"
    if layout != "missing":
        src.mkdir()
    if layout == "no_concepts":
        _png(src / "img.png", (64, 64))
    if layout == "no_images":
        (src / "10_cat").mkdir()
    with pytest.raises(DatasetFolderError, match=str(src)):
        prepare_dataset(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_non_empty_output(tmp_path: Path) -> None:
    _png(tmp_path / "src" / "1_a" / "x.png", (64, 64))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        prepare_dataset(tmp_path / "src", tmp_path / "out", PrepareOptions(resolution=64))
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def _shard_samples(out: Path) -> dict[str, dict[str, bytes]]:
    manifest = json.loads((out / "manifest.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for shard in manifest["shards"]:
        for name, data in _members(out / shard["file"]).items():
            key, ext = name.split(".", 1)
            samples.setdefault(key, {})[ext] = data
    return samples


def _noise_jpeg(size: tuple[int, int], seed: int = 0) -> bytes:
    import random

    rng = random.Random(seed)
    image = Image.frombytes("RGB", size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_adversarial_folder_exact_counts_and_reasons(tmp_path: Path) -> None:
    import numpy as np

    src, concept = tmp_path / "src", tmp_path / "src" / "2_robot"
    _png(concept / "ok.png", (200, 100))
    (concept / "ok.txt").write_text("robot, standing")
    _png(tmp_path / "src" / "1_ロボット" / "画像 1.png", (100, 100))  # Japanese folder and name, no caption
    (concept / "empty.png").write_bytes(b"")
    (concept / "cut.jpg").write_bytes(_noise_jpeg((96, 96))[:1500])
    (concept / "fake.jpg").write_text("<html>not an image</html>")
    _png(concept / "tiny.png", (20, 20))
    Image.new("1", (4000, 3000)).save(concept / "bomb.png")  # tiny file, 12M pixels
    Image.new("CMYK", (80, 80), (0, 255, 255, 0)).save(concept / "cmyk.jpg")  # pure red in CMYK
    palette = Image.new("P", (80, 80), 0)
    palette.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    palette.paste(1, (0, 0, 80, 40))
    palette.save(concept / "pal.png", transparency=0)  # bottom half transparent
    Image.new("LA", (80, 80), (90, 255)).save(concept / "la.png")
    Image.fromarray(np.full((80, 80), 32896, dtype=np.uint16)).save(concept / "deep.png")  # 16-bit grey 50%
    _png(concept / "latin.png", (80, 80))
    (concept / "latin.txt").write_bytes("café, smile".encode("cp1252"))
    _png(concept / "capfile.png", (80, 80))
    (concept / "capfile.caption").write_text("from a .caption file")
    _png(tmp_path / "reg" / "1_person" / "p.png", (80, 80))

    opts = PrepareOptions(resolution=64, min_side=32, max_pixels=10_000_000, reg_src=str(tmp_path / "reg"),
                          workers=1)
    report = prepare_dataset(src, tmp_path / "out", opts)
    reasons = {r["path"].rsplit("/", 1)[-1]: r["reason"] for r in report.rejected}
    assert (report.found, report.accepted, len(report.rejected)) == (14, 9, 5)
    assert reasons["empty.png"] == "empty file (0 bytes)"
    assert reasons["cut.jpg"].startswith("corrupt or truncated")
    assert reasons["fake.jpg"].startswith("not an image")
    assert reasons["tiny.png"].startswith("too small: 20x20")
    assert reasons["bomb.png"].startswith("decompression bomb: 4000x3000 = 12000000 pixels")
    assert [w["path"] for w in report.warnings] == ["2_robot/latin.png"]
    assert "not UTF-8" in report.warnings[0]["warning"]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["found"] == saved["accepted"] + saved["rejected_count"] == 14
    assert {r["path"] for r in saved["rejected"]} == {f"2_robot/{n}" for n in reasons}

    samples = _shard_samples(tmp_path / "out")
    def pixel(key: str, xy: tuple[int, int] = (5, 5)) -> tuple[int, ...]:
        return Image.open(io.BytesIO(samples[key]["png"])).getpixel(xy)  # type: ignore[no-any-return]
    assert samples["2_robot/latin"]["txt"].decode() == "café, smile"
    assert samples["2_robot/capfile"]["txt"].decode() == "from a .caption file"
    assert samples["1_ロボット/画像 1"]["txt"].decode() == "ロボット"
    red = pixel("2_robot/cmyk")
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    assert pixel("2_robot/pal", (5, 5)) == (10, 200, 10) and pixel("2_robot/pal", (5, 60)) == (255, 255, 255)
    assert pixel("2_robot/la") == (90, 90, 90)
    assert all(abs(c - 128) <= 1 for c in pixel("2_robot/deep"))  # scaled, not clipped to white
    reg = json.loads(samples["reg/1_person/p"]["json"])
    assert reg["is_reg"] is True and not json.loads(samples["2_robot/ok"]["json"])["is_reg"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["num_reg_samples"] == 1


def test_buckets_recorded_and_one_bucket_per_shard(tmp_path: Path) -> None:
    src = tmp_path / "src" / "1_mixed"
    sizes = {"wide": (300, 80), "square": (90, 90), "tall": (100, 250), "wide2": (320, 80)}
    for name, size in sizes.items():
        _png(src / f"{name}.png", size)
    prepare_dataset(tmp_path / "src", tmp_path / "out", PrepareOptions(resolution=128, workers=1))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    samples = _shard_samples(tmp_path / "out")
    for shard in manifest["shards"]:
        for name in _members(tmp_path / "out" / shard["file"]):
            if name.endswith(".json"):
                meta = json.loads(samples[name.split(".")[0]]["json"])
                assert meta["bucket"] == shard["bucket"]
    wide = json.loads(samples["1_mixed/wide"]["json"])
    assert wide["bucket"] == [256, 64] and wide["original_size"] == [80, 300]  # aspect 3.75 -> 4
    assert wide["target_size"] == [64, 256] and wide["crop_top_left"] == [2, 0]  # 300x80 -> 256x68
    assert Image.open(io.BytesIO(samples["1_mixed/wide"]["png"])).size == (256, 64)
    tall = json.loads(samples["1_mixed/tall"]["json"])
    assert tall["bucket"] == [64, 192] and tall["crop_top_left"] == [0, 6]  # 100x250 -> 77x192
    assert manifest["buckets"] == {"128x128": {"samples": 1, "samples_with_repeats": 1, "shards": 1},
                                   "256x64": {"samples": 2, "samples_with_repeats": 2, "shards": 1},
                                   "64x192": {"samples": 1, "samples_with_repeats": 1, "shards": 1}}


def test_parallel_prepare_equals_sequential_and_rerun_is_incremental(tmp_path: Path) -> None:
    from dist_lora.data.synthetic import write_shapes_dataset

    write_shapes_dataset(tmp_path / "src", images=40, repeats=1)
    serial = prepare_dataset(tmp_path / "src", tmp_path / "serial", PrepareOptions(resolution=64, shard_size=8,
                                                                                    workers=1))
    parallel = prepare_dataset(tmp_path / "src", tmp_path / "par", PrepareOptions(resolution=64, shard_size=8,
                                                                                   workers=2))
    assert serial.encoded == parallel.encoded == 40
    for shard in sorted(p.name for p in (tmp_path / "serial").glob("*.tar")):
        assert (tmp_path / "serial" / shard).read_bytes() == (tmp_path / "par" / shard).read_bytes()

    # Re-run after one image changed, one caption changed and one image added: only two are decoded again.
    folder = tmp_path / "src" / "1_dlsks shapes"
    Image.new("RGB", (90, 90), (1, 2, 3)).save(folder / "003.png")
    (folder / "004.txt").write_text("dlsks, new caption")
    _png(folder / "zz_new.png", (70, 70))
    again = prepare_dataset(tmp_path / "src", tmp_path / "serial", PrepareOptions(resolution=64, shard_size=8,
                                                                                   workers=1))
    assert (again.found, again.encoded, again.reused) == (41, 2, 39)
    samples = _shard_samples(tmp_path / "serial")
    assert samples["1_dlsks shapes/004"]["txt"].decode() == "dlsks, new caption"
    assert Image.open(io.BytesIO(samples["1_dlsks shapes/003"]["png"])).getpixel((3, 3)) == (1, 2, 3)
    fresh = prepare_dataset(tmp_path / "src", tmp_path / "fresh", PrepareOptions(resolution=64, shard_size=8,
                                                                                  workers=1))
    assert fresh.encoded == 41
    for shard in sorted(p.name for p in (tmp_path / "fresh").glob("*.tar")):
        assert (tmp_path / "fresh" / shard).read_bytes() == (tmp_path / "serial" / shard).read_bytes()
    # Other encoding options: nothing is reused.
    changed = prepare_dataset(tmp_path / "src", tmp_path / "serial", PrepareOptions(resolution=128, shard_size=8,
                                                                                     workers=1))
    assert changed.reused == 0


def test_wildcard_folder_captions_keep_each_line_with_the_trigger(tmp_path: Path) -> None:
    from tests.conftest import shard_members

    src = tmp_path / "src"
    _png(src / "2_robot" / "a.png", (64, 64))
    (src / "2_robot" / "a.txt").write_text("robot, {red|blue}\n\nrobot,   walking\n")
    for wildcard, want in ((True, "zkw, robot, {red|blue}\nzkw, robot, walking"),
                           (False, "zkw, robot, {red|blue} robot, walking")):  # a folder's whole file, one line
        out = tmp_path / f"out-{wildcard}"
        prepare_dataset(src, out, PrepareOptions(resolution=64, trigger="zkw", buckets=False, wildcard=wildcard))
        assert shard_members(out)["2_robot/a"]["txt"].decode() == want
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest.get("wildcard_captions", False) is wildcard
        if wildcard:  # tags counted line by line
            assert manifest["tag_frequency"]["2_robot"] == {"zkw": 2, "robot": 2, "{red|blue}": 1, "walking": 1}


def test_worker_processes_over_several_windows_write_what_one_process_does(tmp_path: Path) -> None:
    # 140 images: two windows of encoding (128 + 12), the second handed to the workers before the first is written.
    for i in range(140):
        _png(tmp_path / "src" / "1_x" / f"{i:03d}.png", (64 + (i % 5) * 16, 96), colour=(i, 40, 200 - i))
    shards = {}
    for workers in (1, 2):
        report = prepare_dataset(tmp_path / "src", tmp_path / f"out{workers}",
                                 PrepareOptions(resolution=64, workers=workers, shard_size=50))
        assert (report.accepted, report.encoded) == (140, 140)
        shards[workers] = {p.name: p.read_bytes() for p in (tmp_path / f"out{workers}").glob("*.tar")}
    assert shards[1] == shards[2] and len(shards[1]) > 2
