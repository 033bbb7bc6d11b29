"""`msdiff data build` at scale: WebDataset tar shards (local or fsspec URLs), sharded manifests read by
everything that reads a manifest, resuming a stopped build, and the Ray engine on a small local cluster."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest
from tiny_detectors import save_tiny_detector_and_segmenter

from msdiffusion.app.cli import main
from msdiffusion.data.build import (
    BuildProgress,
    BuildReport,
    build_sharded,
    format_duration,
    make_phrase_finder,
    plan_shards,
    shard_works,
    tar_items,
)
from msdiffusion.data.dataset import MSDiffusionDataset
from msdiffusion.data.detection import Detection, SubjectFilter
from msdiffusion.data.manifest import (
    INDEX_NAME,
    ManifestError,
    iter_lines,
    manifest_files,
    read_manifest,
    validate_manifest,
)
from msdiffusion.data.tars import iter_tar_samples, list_shards
from msdiffusion.subjects import default_image_processor
from msdiffusion.train.config import TrainConfig
from msdiffusion.train.validation import validation_entries

COLORS = {"red ball": (255, 0, 0), "blue box": (0, 0, 255)}


def _scene(objects, size=(96, 64), fmt="PNG") -> bytes:
    image = PIL.Image.new("RGB", size, (128, 128, 128))
    draw = PIL.ImageDraw.Draw(image)
    for phrase, box in objects:
        draw.rectangle(box, fill=COLORS[phrase])
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _write_tar(path, samples):
    """A shard as img2dataset writes it: per sample KEY.png (here PNG: exact colours) + KEY.txt + KEY.json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path


def _still(key, text, objects, **extra):
    members = {"png": _scene(objects), "txt": text.encode(), "json": json.dumps({"key": key, **extra}).encode()}
    return key, members


def _shards(folder):
    """Two shards of stills: four usable samples, one without a caption, one whose image is broken."""
    _write_tar(
        folder / "00000.tar",
        [
            _still(
                "000000000", "a red ball and a blue box", [("red ball", (4, 4, 30, 40)), ("blue box", (50, 10, 90, 60))]
            ),
            _still("000000001", "", []),
            _still("000000002", "a red ball", [("red ball", (20, 10, 70, 50))], caption="a red ball"),
        ],
    )
    broken = ("000000011", {"png": b"not an image", "txt": b"a red ball"})
    _write_tar(
        folder / "00001.tar",
        [
            _still("000000010", "a blue box", [("blue box", (10, 10, 60, 60))]),
            broken,
            _still(
                "000000012",
                "a blue box next to a red ball",
                [("blue box", (2, 2, 40, 60)), ("red ball", (50, 5, 90, 45))],
            ),
        ],
    )
    return folder


class ColorDetector:
    """Finds each phrase's colour (exact boxes, the same whatever the batch), and counts the images it saw."""

    def __init__(self, fail_on=None):
        self.seen = 0
        self.fail_on = fail_on

    def __call__(self, images, phrases, threshold):
        results = []
        for image, queries in zip(images, phrases):
            self.seen += 1
            if self.fail_on is not None and self.seen > self.fail_on:
                raise RuntimeError("stopped")
            array = np.asarray(image)
            found = []
            for phrase in queries:
                ys, xs = np.nonzero((array == COLORS.get(phrase, (-1, -1, -1))).all(axis=-1))
                if len(xs):
                    w, h = image.size
                    box = (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)
                    found.append(Detection(phrase, box, 0.9))
            results.append(found)
        return results


def _build(source, out, detector=None, **kwargs):
    specs, _ = plan_shards(source, **kwargs)
    return build_sharded(specs, out, detector or ColorDetector(), SubjectFilter(), make_phrase_finder(), batch_size=2)


# --- tar sources -----------------------------------------------------------------------------------


def test_tar_shards_are_listed_and_streamed_by_key(tmp_path):
    source = _shards(tmp_path / "tars")
    assert [p.rsplit("/", 1)[1] for p in list_shards(source)] == ["00000.tar", "00001.tar"]
    assert list_shards(f"file://{source}/{{00000..00001}}.tar") == [
        f"file://{source}/00000.tar",
        f"file://{source}/00001.tar",
    ]
    assert len(list_shards(f"{source}/*.tar")) == 2
    samples = list(iter_tar_samples(f"file://{source}/00000.tar"))
    assert [s.key for s in samples] == ["000000000", "000000001", "000000002"]
    assert set(samples[0].members) == {"png", "txt", "json"}
    with pytest.raises(FileNotFoundError, match="00002.tar"):
        list_shards(f"{source}/{{00000..00002}}.tar")

    items, skipped = tar_items(source, limit=2)
    assert [i.caption for i in items] == ["a red ball and a blue box", "a red ball"]
    assert skipped == {"no caption file or empty caption": 1}
    # The caption from a field of KEY.json instead of KEY.txt: only sample 2 has one.
    works = list(shard_works(plan_shards(source, caption_field="caption")[0][0]))
    assert [w.skipped is None for w in works] == [False, False, True]


def test_sharded_build_from_tar_shards_writes_images_and_an_index(tmp_path):
    out = tmp_path / "out"
    report = _build(f"file://{_shards(tmp_path / 'tars')}", out)
    assert (report.items, report.written) == (6, 4)
    assert report.skipped == {"no caption file or empty caption": 1, "unreadable image": 1}
    assert sorted(p.name for p in out.glob("manifest*")) == ["manifest-00000.jsonl", "manifest-00001.jsonl", INDEX_NAME]
    index = json.loads((out / INDEX_NAME).read_text())
    assert [(s["file"], s["samples"]) for s in index["shards"]] == [
        ("manifest-00000.jsonl", 2),
        ("manifest-00001.jsonl", 2),
    ]

    samples = read_manifest(out / INDEX_NAME)
    assert [s.id for s in samples] == [
        "00000_000000_000000000",
        "00000_000002_000000002",
        "00001_000000_000000010",
        "00001_000002_000000012",
    ]
    first = samples[0]
    # The target was written out byte for byte; references point at it with a crop box.
    assert first.image == out / "images" / "00000" / "00000_000000_000000000.png"
    assert first.subjects[0].reference.image == first.image and first.subjects[0].reference.crop is not None
    assert validate_manifest(out, open_images=True)[2] == 0  # the folder works as the manifest too

    dataset = MSDiffusionDataset(
        out / INDEX_NAME, resolution=32, crop="center", image_processor=default_image_processor()
    )
    assert len(dataset) == 4 and dataset[3]["num_subjects"] == 2
    assert dataset.location(2) == f"{out / 'manifest-00001.jsonl'}:1"
    # Training's validation images from the manifest name a sample's own shard when its reference is unreadable.
    samples[2].subjects[0].reference.image.write_bytes(b"not an image")
    config = TrainConfig(validation_samples=4, max_subjects=4)
    with pytest.raises(ValueError, match=f"^{re.escape(str(out / 'manifest-00001.jsonl'))}:1: subjects\\[0\\]"):
        validation_entries(config, dataset)
    # Line numbers count through the shards in order (the feature cache keys lines by them).
    assert [number for number, _, _ in iter_lines(out / INDEX_NAME)] == [1, 2, 3, 4]


def test_clips_from_tar_frame_lists_take_references_from_the_first_frame(tmp_path):
    frames = {f"{k:03d}.png": _scene([("red ball", (x, 10, x + 20, 40))]) for k, x in enumerate((4, 40, 60))}
    _write_tar(tmp_path / "clips" / "00000.tar", [("clip0", {**frames, "txt": b"a red ball rolling"})])
    specs, _ = plan_shards(tmp_path / "clips", video=True)
    build_sharded(specs, tmp_path / "out", ColorDetector(), SubjectFilter(), make_phrase_finder(), save_crops=True)
    ((subject,),) = [s.subjects for s in read_manifest(tmp_path / "out")]
    assert subject.box == pytest.approx((40 / 96, 10 / 64, 61 / 96, 41 / 64))  # from the middle frame
    crop = PIL.Image.open(subject.reference.image)  # a crop of frame 0, where the ball is at x = 4
    assert subject.reference.image.parent == tmp_path / "out" / "crops" / "00000"
    assert crop.size == (21, 31) and crop.getpixel((10, 10)) == (255, 0, 0)


def _video(frames: list[bytes]) -> bytes:
    """An MPEG-4 video of `frames` (PNG bytes), as video2dataset's KEY.mp4 members are."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.options = {"qscale": "1"}  # near-lossless: the ball stays red after the round trip
        for data in frames:
            frame = av.VideoFrame.from_image(PIL.Image.open(io.BytesIO(data)).convert("RGB"))
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


def test_clips_from_tar_video_files_take_references_from_the_first_frame(tmp_path):
    pytest.importorskip("av", reason="reading video files needs PyAV (the scale extra installs it)")
    frames = [_scene([("red ball", (x, 10, x + 20, 40))]) for x in (4, 40, 60)]
    _write_tar(tmp_path / "clips" / "00000.tar", [("clip0", {"mp4": _video(frames), "txt": b"a red ball rolling"})])
    specs, _ = plan_shards(tmp_path / "clips", video=True)

    def near_colour(images, phrases, threshold):  # the codec shifts colours a little: ColorDetector, within 40
        found = []
        for image, queries in zip(images, phrases):
            array = np.asarray(image).astype(int)
            ys, xs = np.nonzero((np.abs(array - COLORS["red ball"]) <= 40).all(axis=-1))
            w, h = image.size
            box = (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)
            found.append([Detection(q, box, 0.9) for q in queries if q == "red ball"])
        return found

    build_sharded(specs, tmp_path / "out", near_colour, SubjectFilter(), make_phrase_finder(), save_crops=True)
    ((subject,),) = [s.subjects for s in read_manifest(tmp_path / "out")]
    # from the middle frame (the codec's blur may move an edge by a pixel)
    assert subject.box == pytest.approx((40 / 96, 10 / 64, 61 / 96, 41 / 64), abs=2 / 64)
    crop = np.asarray(PIL.Image.open(subject.reference.image).convert("RGB")).astype(int)
    assert abs(crop.shape[1] - 21) <= 2 and abs(crop.shape[0] - 31) <= 2  # frame 0's ball, at x = 4
    assert crop[10, 10, 0] > 200 and crop[10, 10, 1] < 60  # red


# --- sharded manifests -----------------------------------------------------------------------------


def test_a_stopped_build_continues_after_its_finished_shards(tmp_path):
    source = _shards(tmp_path / "tars")
    with pytest.raises(RuntimeError, match="stopped"):
        _build(source, tmp_path / "out", ColorDetector(fail_on=3))  # shard 0 has 2 readable images
    assert (tmp_path / "out" / "manifest-00000.jsonl").is_file()
    assert not (tmp_path / "out" / "manifest-00001.jsonl").exists() and not (tmp_path / "out" / INDEX_NAME).exists()
    with pytest.raises(FileNotFoundError, match="did not finish"):
        manifest_files(tmp_path / "out")

    detector = ColorDetector()
    report = _build(source, tmp_path / "out", detector)
    assert detector.seen == 2 and (report.items, report.written) == (6, 4)  # only shard 1's images
    _build(source, tmp_path / "fresh")
    for name in ("manifest-00000.jsonl", "manifest-00001.jsonl", INDEX_NAME):
        assert (tmp_path / "out" / name).read_text() == (tmp_path / "fresh" / name).read_text()

    other = _shards(tmp_path / "other")
    with pytest.raises(ValueError, match="another build"):
        _build(other, tmp_path / "out")


def test_problems_of_a_sharded_manifest_name_their_shard(tmp_path, capsys):
    out = tmp_path / "out"
    _build(_shards(tmp_path / "tars"), out)
    shard = out / "manifest-00001.jsonl"
    lines = shard.read_text().splitlines()
    shard.write_text(lines[0] + "\n" + lines[1].replace('"caption"', '"catpion"') + "\n")
    with pytest.raises(ManifestError, match=r"manifest-00001.jsonl:2: catpion: unknown key"):
        read_manifest(out / INDEX_NAME)
    with pytest.raises(ManifestError, match=r"manifest-00001.jsonl:2: catpion"):
        MSDiffusionDataset(out / INDEX_NAME, image_processor=default_image_processor())
    assert main(["data", "check", str(out), "--workers", "1", "--quiet"]) == 1
    printed = capsys.readouterr().out
    assert "manifest-00001.jsonl:2: catpion: unknown key" in printed and "samples: 3 valid, 1 line(s)" in printed
    (out / INDEX_NAME).write_text("{}")
    assert main(["data", "check", str(out / INDEX_NAME)]) == 2
    assert "not a manifest index" in capsys.readouterr().err


def test_build_command_on_tar_shards_and_folders_with_shard_size(tmp_path, capsys):
    tars = _shards(tmp_path / "tars")
    photos = tmp_path / "photos"
    photos.mkdir()
    for k in range(3):
        (photos / f"{k}.png").write_bytes(_scene([("red ball", (10, 10, 50, 50))]))
        (photos / f"{k}.txt").write_text("a red ball")
    models = save_tiny_detector_and_segmenter(tmp_path / "models")
    flags = ["--detector", str(models["detector"]), "--device", "cpu", "--score-threshold", "0.0"]
    flags += ["--min-box-area", "0.001", "--max-overlap", "1.0"]
    assert main(["data", "build", str(tars), "--out", str(tmp_path / "a"), *flags]) == 0
    printed = capsys.readouterr()
    assert "4 of 6 items written" in printed.out
    assert "shards 2/2 | samples 6 | " in printed.err and "s left" in printed.err  # the progress line
    assert len(read_manifest(tmp_path / "a" / INDEX_NAME)) == 4
    assert main(["data", "build", str(tars), "--out", str(tmp_path / "a"), *flags]) == 2
    assert "manifest-index.json exists; pass --overwrite" in capsys.readouterr().err

    assert main(["data", "build", str(photos), "--out", str(tmp_path / "b"), "--shard-size", "2", *flags]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "b").glob("manifest-0*")) == [
        "manifest-00000.jsonl",
        "manifest-00001.jsonl",
    ]
    # --limit: a trial into one manifest.jsonl, tar sources too
    assert main(["data", "build", str(tars), "--out", str(tmp_path / "c"), "--limit", "1", "--quiet", *flags]) == 0
    assert len(read_manifest(tmp_path / "c" / "manifest.jsonl")) == 1
    assert "samples/s" not in capsys.readouterr().err
    assert main(["data", "build", str(tars), "--out", str(tmp_path / "d"), "--detector-workers", "2", *flags]) == 2
    assert "need(s) --engine ray" in capsys.readouterr().err


# --- the Ray engine --------------------------------------------------------------------------------


def test_ray_engine_without_ray_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    import msdiffusion.data.ray_engine as ray_engine

    monkeypatch.setattr(ray_engine, "ray_available", lambda: False)
    models = save_tiny_detector_and_segmenter(tmp_path / "models")
    args = ["data", "build", str(_shards(tmp_path / "tars")), "--out", str(tmp_path / "out"), "--engine", "ray"]
    assert main([*args, "--detector", str(models["detector"])]) == 2
    assert 'pip install -e ".[scale]"' in capsys.readouterr().err


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason='the ray engine needs Ray Data: pip install -e ".[scale]"')
    pytest.importorskip("ray.data", reason='the ray engine needs Ray Data: pip install -e ".[scale]"')
    ray.init(
        num_cpus=2,
        object_store_memory=100 * 1024**2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()


@pytest.mark.slow  # a local Ray cluster: about 20 s
def test_ray_engine_writes_the_local_engines_manifest(local_ray, tmp_path, capsys):
    """Same source, same models and flags: the two engines write the same shards, masks and index."""
    models = save_tiny_detector_and_segmenter(tmp_path / "models")
    source = _shards(tmp_path / "tars")
    flags = ["--detector", str(models["detector"]), "--segmenter", str(models["segmenter"]), "--device", "cpu"]
    flags += ["--score-threshold", "0.0", "--min-box-area", "0.001", "--max-overlap", "1.0", "--batch-size", "2"]
    assert main(["data", "build", f"file://{source}", "--out", str(tmp_path / "local"), *flags]) == 0
    local = capsys.readouterr().out
    ray_flags = ["--engine", "ray", "--detector-workers", "1", "--cpus-per-worker", "0.5", "--gpus-per-worker", "0"]
    assert main(["data", "build", f"file://{source}", "--out", str(tmp_path / "ray"), *flags, *ray_flags]) == 0
    assert capsys.readouterr().out.replace(str(tmp_path / "ray"), "") == local.replace(str(tmp_path / "local"), "")

    written = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*") if p.is_file())
    assert written == sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").rglob("*") if p.is_file())
    assert any(str(p).startswith("masks/") for p in written)
    for path in written:
        assert (tmp_path / "local" / path).read_bytes() == (tmp_path / "ray" / path).read_bytes(), path
    assert len(read_manifest(tmp_path / "ray" / INDEX_NAME)) == 4


@pytest.mark.slow  # a local Ray cluster: about 20 s
def test_ray_engine_retries_a_killed_detector_worker_and_the_manifest_is_complete(local_ray, tmp_path):
    """A detector actor killed (SIGKILL) in the middle of a shard is restarted by Ray, its batch sent again."""
    from ray import cloudpickle

    from msdiffusion.data.ray_engine import build_with_ray

    source = _many_shards(tmp_path / "tars", shards=3, per_shard=6)
    pid_file = tmp_path / "detector.pid"
    killed = []

    def kill_when_paused():
        deadline = time.monotonic() + 120
        while not pid_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_file.is_file():
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_when_paused, daemon=True)
    killer.start()
    # The test's detector goes to the workers by value: they cannot import this test module.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        specs, _ = plan_shards(source)
        report = build_with_ray(
            specs,
            tmp_path / "ray",
            PausingDetector(str(pid_file)),
            SubjectFilter(),
            make_phrase_finder(),
            batch_size=2,
            cpus_per_worker=0.5,
            gpus_per_worker=0,
        )
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    killer.join(timeout=5)
    assert killed, "the detector worker never paused to be killed"
    _build(source, tmp_path / "local")
    assert report.items == 18 and _sorted_lines(tmp_path / "ray") == _sorted_lines(tmp_path / "local")


class PausingDetector:
    """Test-only detector factory: the first actor to load it writes its PID after one batch and then waits,
    mid-shard, to be killed; the actor Ray restarts finds the PID file and runs through."""

    def __init__(self, pid_file: str):
        self.pid_file = pid_file

    def __call__(self):
        return _PausingColorDetector(self.pid_file)


class _PausingColorDetector(ColorDetector):
    def __init__(self, pid_file: str):
        super().__init__()
        self.pid_file, self.calls = pid_file, 0

    def __call__(self, images, phrases, threshold):
        self.calls += 1
        if self.calls == 2 and not os.path.exists(self.pid_file):
            with open(self.pid_file + ".tmp", "w") as handle:
                handle.write(str(os.getpid()))
            os.replace(self.pid_file + ".tmp", self.pid_file)
            time.sleep(300)  # killed long before
        return super().__call__(images, phrases, threshold)


# --- stopping and resuming the build command -------------------------------------------------------


def _many_shards(folder, shards, per_shard):
    """`shards` tar shards of `per_shard` captioned stills each, every one different."""
    for number in range(shards):
        samples = []
        for k in range(per_shard):
            x, y = 2 + (7 * k + 3 * number) % 40, 2 + (5 * k + number) % 20
            objects = [("red ball", (x, y, x + 20 + k % 5, y + 30))]
            caption = "a red ball"
            if (k + number) % 2:
                objects.append(("blue box", (x + 30, 8, x + 50, 50)))
                caption = "a red ball and a blue box"
            samples.append(_still(f"{number:04d}{k:05d}", caption, objects))
        _write_tar(folder / f"{number:05d}.tar", samples)
    return folder


def _sorted_lines(out):
    """Every manifest line of a sharded build, sorted by sample id; fails on a duplicate id."""
    lines = [line for path in manifest_files(out) for line in path.read_text().splitlines() if line.strip()]
    ids = [json.loads(line)["id"] for line in lines]
    assert len(ids) == len(set(ids)), "duplicate samples"
    return [line for _, line in sorted(zip(ids, lines))]


@pytest.fixture(scope="module")
def kill_setup(tmp_path_factory):
    """Tar shards, the tiny models, the build flags and an uninterrupted local build to compare with."""
    folder = tmp_path_factory.mktemp("kill")
    source = _many_shards(folder / "tars", shards=8, per_shard=12)
    models = save_tiny_detector_and_segmenter(folder / "models")
    # No SAM: it would triple the time, and the engines' masks are compared by the test above.
    flags = ["--detector", str(models["detector"]), "--device", "cpu", "--score-threshold", "0.0"]
    flags += ["--min-box-area", "0.001", "--max-overlap", "1.0", "--batch-size", "2"]
    assert main(["data", "build", str(source), "--out", str(folder / "fresh"), "--quiet", *flags]) == 0
    return source, flags, _sorted_lines(folder / "fresh")


def _command(source, out, flags):
    return [sys.executable, "-m", "msdiffusion", "data", "build", str(source), "--out", str(out), *flags]


def _environment():
    # A small object store for the Ray runs (the default is 30% of the machine's memory).
    return {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES": str(100 * 1024**2)}


def _kill_after_first_shard(command, out, timeout=240):
    """Run the build; SIGKILL the driver as soon as a shard is finished. Returns the finished shards' count."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_environment(), start_new_session=True
    )
    deadline = time.monotonic() + timeout
    try:
        while not any(out.glob("manifest-0*.jsonl")):
            if process.poll() is not None:
                pytest.fail(f"the build ended before a shard was finished:\n{process.stdout.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail("no shard finished in time")
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        # Ray's own processes share the driver's fate; anything else of the build's session goes too.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.stdout.close()
    finished = len(list(out.glob("manifest-0*.jsonl")))
    assert not (out / INDEX_NAME).exists(), "the build finished before it was killed: make the shards bigger"
    return finished


def _resume(command):
    done = subprocess.run(command, capture_output=True, text=True, env=_environment(), timeout=600)
    assert done.returncode == 0, done.stderr
    assert "continuing the unfinished build" in done.stderr
    return done


def test_a_killed_local_build_run_again_gives_the_uninterrupted_manifest(kill_setup, tmp_path):
    source, flags, fresh = kill_setup
    out = tmp_path / "out"
    command = _command(source, out, flags)
    finished = _kill_after_first_shard(command, out)
    assert 1 <= finished < 8
    done = _resume(command)
    assert "shards 8/8" in done.stderr and "samples 96/" not in done.stderr  # tar shards: no total known ahead
    assert _sorted_lines(out) == fresh


@pytest.mark.slow
def test_a_killed_ray_build_run_again_gives_the_uninterrupted_manifest(kill_setup, tmp_path):
    pytest.importorskip("ray.data", reason='the ray engine needs Ray Data: pip install -e ".[scale]"')
    source, flags, fresh = kill_setup
    out = tmp_path / "out"
    ray_flags = ["--engine", "ray", "--cpus-per-worker", "0.5", "--gpus-per-worker", "0"]
    command = _command(source, out, [*flags, *ray_flags])
    finished = _kill_after_first_shard(command, out)
    assert 1 <= finished < 8
    _resume(command)
    assert _sorted_lines(out) == fresh


# --- progress --------------------------------------------------------------------------------------


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_counts_shards_and_samples_and_estimates_the_time_left():
    stream, clock = io.StringIO(), _Clock()
    progress = BuildProgress(shards=4, stream=stream, clock=clock, log_interval=10)
    progress.resume([BuildReport(items=50)])  # an earlier run's shard: counted, not in the rate
    assert "time left: after the first shard" in progress.line()
    clock.now = 5.0
    progress.add_samples(50)
    progress.shard_done(BuildReport(items=50))
    # 50 samples in 5 s; 2 shards of about 50 left: 100 samples at 10/s, 10 s.
    assert progress.line() == "shards 2/4 | samples 100 | 10.0 samples/s | 10s left"
    clock.now = 6.0
    progress.add_samples(10)  # within 10 s of the last line: not printed
    assert stream.getvalue().count("\n") == 1
    progress.close()
    assert stream.getvalue().splitlines()[-1] == "  shards 2/4 | samples 110 | 10.0 samples/s | 9s left"

    known = BuildProgress(shards=2, samples_total=100, stream=io.StringIO(), clock=clock, quiet=True)
    clock.now = 10.0
    known.add_samples(40)
    assert known.line().endswith("samples 40/100 | 10.0 samples/s | 6s left")
    known.close()
    assert known.stream.getvalue() == ""
    assert [format_duration(s) for s in (12, 185, 4 * 3600 + 150, 3 * 86400 + 7200)] == [
        "12s",
        "3m 05s",
        "4h 02m",
        "3d 02h",
    ]
