"""`dist-lora prepare --webdataset`: existing shards (written here by webdataset's own TarWriter, laid out
as img2dataset writes them) as a source, and prepare over several processes merged into one dataset."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import webdataset as wds
from PIL import Image

from dist_lora.cli import main
from dist_lora.data.kohya import DatasetFolderError
from dist_lora.data.prepare import PrepareOptions, prepare_dataset
from dist_lora.data.webdataset_source import WebDatasetSource
from tests.integration.distributed_helpers import REPO, free_port

SIZES = [(160, 96), (96, 160), (128, 128), (200, 100), (90, 150)]


def _image_bytes(index: int, fmt: str) -> bytes:
    width, height = SIZES[index % len(SIZES)]
    image = Image.new("RGB", (width, height), (20 * index % 255, 90, 200 - 7 * index))
    image.paste((250, 240 - 11 * index, 10), (index % 30, 10, index % 30 + 40, 50))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _write_shards(folder: Path, shards: int = 4, per_shard: int = 5) -> list[dict[str, Any]]:
    """img2dataset-style shards: <key>.jpg (or .png / .webp), <key>.txt and <key>.json per sample. Returns what
    each sample holds, with its shard's name."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for shard in range(shards):
        with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as sink:
            for i in range(per_shard):
                index = shard * per_shard + i
                ext, fmt = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")][index % 3]
                sample = {"__key__": f"{shard:05d}{i:04d}", ext: _image_bytes(index, fmt),
                          "txt": f"photo {index}, blue".encode(),
                          "json": json.dumps({"caption": f"json caption {index}", "meta": {"prompt": f"p{index}"},
                                              "width": SIZES[index % len(SIZES)][0]}).encode()}
                sink.write(sample)
                written.append({**sample, "shard": f"{shard:05d}", "ext": ext})
    return written


def _samples(folder: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of a prepared folder, by key, from its manifest's shards."""
    manifest = json.loads((folder / "manifest.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for shard in manifest["shards"]:
        with tarfile.open(folder / shard["file"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return samples


def _counts(folder: Path) -> dict[str, Any]:
    """The manifest's counts; how many shards a bucket fills depends on how many processes wrote it."""
    manifest = json.loads((folder / "manifest.json").read_text())
    buckets = {name: {k: v for k, v in counts.items() if k != "shards"} for name, counts in manifest["buckets"].items()}
    return {**{k: manifest[k] for k in ("num_samples", "num_samples_with_repeats", "tag_frequency")},
            "buckets": buckets}


def test_shards_prepare_as_the_same_images_in_a_folder(tmp_path: Path) -> None:
    written = _write_shards(tmp_path / "wds")
    # The same files as a kohya folder: prepare must encode each image exactly as it does a file's.
    for sample in written:
        concept = tmp_path / "src" / "1_webdataset"
        concept.mkdir(parents=True, exist_ok=True)
        (concept / f"{sample['__key__']}.{sample['ext']}").write_bytes(sample[sample["ext"]])
        (concept / f"{sample['__key__']}.txt").write_bytes(sample["txt"])
    opts = PrepareOptions(resolution=128, shard_size=3, workers=1, trigger="zkw")
    shards = WebDatasetSource.open(str(tmp_path / "wds" / "{00000..00003}.tar"))
    report = prepare_dataset(None, tmp_path / "out", opts, webdataset=shards)
    prepare_dataset(tmp_path / "src", tmp_path / "folder", opts)
    assert (report.found, report.accepted, report.encoded, report.reused) == (20, 20, 20, 0)
    got, expected = _samples(tmp_path / "out"), _samples(tmp_path / "folder")
    assert len(got) == 20 and all(k.split("/")[0] in {"00000", "00001", "00002", "00003"} for k in got)
    for key, sample in got.items():
        twin = expected[f"1_webdataset/{key.split('/')[1]}"]
        assert sample["png"] == twin["png"] and sample["txt"] == twin["txt"]
        meta, twin_meta = json.loads(sample["json"]), json.loads(twin["json"])
        assert meta["source"] == key and meta["repeats"] == 1
        assert {k: meta[k] for k in ("original_size", "crop_top_left", "target_size", "bucket")} == \
               {k: twin_meta[k] for k in ("original_size", "crop_top_left", "target_size", "bucket")}
    assert _counts(tmp_path / "out")["buckets"] == _counts(tmp_path / "folder")["buckets"]
    assert got["00002/000020004"]["txt"] == b"zkw, photo 14, blue"


def test_caption_key_pipe_urls_and_samples_without_an_image(tmp_path: Path) -> None:
    _write_shards(tmp_path / "wds", shards=2, per_shard=3)
    with wds.TarWriter(str(tmp_path / "wds" / "00002.tar")) as sink:
        sink.write({"__key__": "nothing", "txt": b"a caption and no image", "json": b"{}"})
        sink.write({"__key__": "broken", "jpg": b"not a jpeg", "json": b"{\"caption\": \"x\"}"})
        sink.write({"__key__": "tagged", "png": _image_bytes(3, "PNG"), "json": b"{\"meta\": {\"prompt\": null}}"})
    urls = "::".join(f"pipe:cat {tmp_path / 'wds' / f'{i:05d}.tar'}" for i in range(3))
    report = prepare_dataset(None, tmp_path / "out", PrepareOptions(resolution=128, workers=1),
                             webdataset=WebDatasetSource.open(urls, "meta.prompt"))
    assert (report.found, report.accepted) == (9, 7)
    reasons = {r["path"]: r["reason"] for r in report.rejected}
    assert reasons["00002/nothing"].startswith("no image member") and "json, txt" in reasons["00002/nothing"]
    assert reasons["00002/broken"].startswith("not an image")
    assert {w["path"]: w["warning"] for w in report.warnings} == {"00002/tagged": ".json key 'meta.prompt' is null: "
                                                                                  "empty caption"}
    samples = _samples(tmp_path / "out")
    assert samples["00001/000010002"]["txt"] == b"p5" and samples["00002/tagged"]["txt"] == b""


def test_rerun_reuses_unchanged_samples_and_bad_sources_are_refused(tmp_path: Path) -> None:
    _write_shards(tmp_path / "wds", shards=2, per_shard=4)
    pattern = str(tmp_path / "wds" / "{00000..00001}.tar")
    opts = PrepareOptions(resolution=128, workers=1, val_fraction=0.25)
    first = prepare_dataset(None, tmp_path / "out", opts, webdataset=WebDatasetSource.open(pattern))
    assert first.validation is not None and first.accepted + first.validation.accepted == 8
    before = _samples(tmp_path / "out")
    again = prepare_dataset(None, tmp_path / "out", opts, webdataset=WebDatasetSource.open(pattern))
    assert (again.encoded, again.reused, again.validation.encoded) == (0, first.accepted, 0)  # type: ignore[union-attr]
    assert _samples(tmp_path / "out") == before
    # One sample's image changes (same key, same size of file or not): only it is encoded again.
    shard = tmp_path / "wds" / "00001.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    with wds.TarWriter(str(shard)) as sink:
        for key in sorted({m.name.split(".", 1)[0] for m, _ in members}):
            sample = {"__key__": key, **{m.name.split(".", 1)[1]: d for m, d in members if m.name.startswith(key)}}
            if key == "000010001":
                sample["png"] = _image_bytes(17, "PNG")
            sink.write(sample)
    third = prepare_dataset(None, tmp_path / "out", opts, webdataset=WebDatasetSource.open(pattern))
    assert third.encoded + third.validation.encoded == 1  # type: ignore[union-attr]

    with pytest.raises(DatasetFolderError, match=r"1 of its 3 shard\(s\) do not exist, first '.*00002.tar'"):
        WebDatasetSource.open(str(tmp_path / "wds" / "{00000..00002}.tar"))
    (tmp_path / "wds" / "00003.tar").write_bytes(shard.read_bytes()[:3000])  # cut inside a member
    with pytest.raises(DatasetFolderError, match=r"shard '.*00003.tar' cannot be read"):
        prepare_dataset(None, tmp_path / "cut", opts, webdataset=WebDatasetSource.open(str(tmp_path / "wds" /
                                                                                           "00003.tar")))
    assert not (tmp_path / "cut").exists() and not list(tmp_path.glob(".cut.*"))
    with pytest.raises(DatasetFolderError, match="give one source"):
        prepare_dataset(tmp_path / "wds", tmp_path / "x", opts, webdataset=WebDatasetSource.open(pattern))
    assert main(["prepare", "src", str(tmp_path / "y"), "--caption-key", "caption"]) == 2


def _launch(args: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / "cpu_2proc.yaml"),
           "--main_process_port", free_port(), "-m", "dist_lora.cli", "prepare", *args]
    return subprocess.run(cmd, cwd=tmp, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)


def _srun_tasks(args: list[str], tmp: Path) -> list[subprocess.CompletedProcess[str]]:
    """Two tasks with only the variables srun gives its tasks (no RANK, no rendezvous address)."""
    port = free_port()
    procs = []
    for task in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env.update(SLURM_PROCID=str(task), SLURM_LOCALID=str(task), SLURM_STEP_NUM_TASKS="2", SLURM_JOB_ID="77",
                   SLURM_STEP_ID="0", SLURM_STEP_NODELIST="127.0.0.1", SLURM_STEP_TASKS_PER_NODE="2",
                   MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "dist_lora.cli", "prepare", *args], cwd=tmp, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


@pytest.mark.slow
def test_two_processes_prepare_what_one_does(tmp_path: Path) -> None:
    _write_shards(tmp_path / "wds", shards=5, per_shard=4)
    pattern = str(tmp_path / "wds" / "{00000..00004}.tar")
    common = ["--resolution", "128", "--shard-size", "3", "--val-fraction", "0.2", "--workers", "1"]
    assert main(["prepare", "--webdataset", pattern, str(tmp_path / "one"), *common]) == 0
    proc = _launch(["--webdataset", pattern, str(tmp_path / "two"), *common], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("found ") == 1  # the main process reports
    for split in ("", "val"):
        assert _counts(tmp_path / "two" / split) == _counts(tmp_path / "one" / split)
        assert _samples(tmp_path / "two" / split) == _samples(tmp_path / "one" / split)
    one_report = json.loads((tmp_path / "one" / "report.json").read_text())
    two_report = json.loads((tmp_path / "two" / "report.json").read_text())
    for key in ("found", "accepted", "encoded", "samples_with_repeats", "buckets", "audit"):  # not "shards"
        assert two_report[key] == one_report[key], key
    assert "processes" not in one_report and two_report["processes"] == [12, 8]  # shards 0, 2, 4 and 1, 3
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if not p.name.endswith(".tar")) == \
           sorted(p.name for p in (tmp_path / "one").iterdir() if not p.name.endswith(".tar"))
    # Incremental on two processes as on one: nothing is decoded again.
    proc = _launch(["--webdataset", pattern, str(tmp_path / "two"), *common], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((tmp_path / "two" / "report.json").read_text())
    assert (again["encoded"], again["reused"]) == (0, one_report["accepted"])
    assert _samples(tmp_path / "two") == _samples(tmp_path / "one")

    # A kohya folder over two srun tasks (Slurm's variables only) = one process.
    src = tmp_path / "src" / "2_thing"
    src.mkdir(parents=True)
    for i in range(9):
        (src / f"{i}.png").write_bytes(_image_bytes(i, "PNG"))
        (src / f"{i}.txt").write_text(f"thing {i}")
    assert main(["prepare", str(tmp_path / "src"), str(tmp_path / "folder_one"), *common]) == 0
    results = _srun_tasks([str(tmp_path / "src"), str(tmp_path / "folder_two"), *common], tmp_path)
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    assert json.loads((tmp_path / "folder_two" / "report.json").read_text())["processes"] == [5, 4]
    for split in ("", "val"):
        assert _counts(tmp_path / "folder_two" / split) == _counts(tmp_path / "folder_one" / split)
        assert _samples(tmp_path / "folder_two" / split) == _samples(tmp_path / "folder_one" / split)

    # A shard that cannot be read on one process stops both, and nothing is written.
    (tmp_path / "wds" / "00001.tar").write_bytes((tmp_path / "wds" / "00001.tar").read_bytes()[:3000])
    proc = _launch(["--webdataset", pattern, str(tmp_path / "cut"), *common], tmp_path)
    assert proc.returncode != 0 and "00001.tar' cannot be read" in proc.stderr
    assert not (tmp_path / "cut").exists() and not list(tmp_path.glob(".cut.*"))
