import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from dist_lora.data.kohya import DatasetFolderError
from dist_lora.data.prepare import PrepareOptions, prepare_dataset, resize_and_crop


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
    report = prepare_dataset(src, tmp_path / "out", PrepareOptions(resolution=64, trigger="zkw", shard_size=2))
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
    cropped, (top, left) = resize_and_crop(image, 64)
    assert cropped.size == (64, 64) and (top, left) == (0, 64)


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
