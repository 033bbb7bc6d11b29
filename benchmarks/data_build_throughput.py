"""`msdiff data build` throughput: the local engine and the Ray engine with 1 and 2 detector workers.

Makes its own WebDataset tar shards (captioned JPEG scenes of coloured boxes) and the tests' tiny
random OWLv2 and SAM in a temporary folder, then builds the same sharded manifest (`--masks`) with
each engine, one after the other in this process, and prints samples/s and the ratios between them.
The rate is end to end: models loaded, actors started, every shard written (Ray itself is started
once before the Ray runs and timed apart); the time until the first sample came back shows the
start-up in it. With `--repeats N` the three runs take turns N times and the median is reported.
Every run must write the same manifest lines, which is checked. On a CPU the tiny models only show
what the engines cost around the models; with real models on GPUs the detector dominates.

    python benchmarks/data_build_throughput.py --shards 4 --per-shard 40
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw

# The tests' tiny models: one definition of them.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

COLORS = {"red ball": (230, 30, 30), "blue box": (30, 30, 230), "green cup": (30, 200, 30)}


def make_shards(folder: Path, shards: int, per_shard: int, size: tuple[int, int], seed: int = 0) -> Path:
    """`shards` tar shards of `per_shard` captioned JPEG scenes, as img2dataset writes them."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    for number in range(shards):
        with tarfile.open(folder / f"{number:05d}.tar", "w") as archive:
            for k in range(per_shard):
                image = PIL.Image.new("RGB", size, tuple(int(v) for v in rng.integers(90, 170, 3)))
                draw = PIL.ImageDraw.Draw(image)
                phrases = list(rng.choice(list(COLORS), size=int(rng.integers(1, 4)), replace=False))
                for phrase in phrases:
                    x, y = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
                    draw.rectangle((x, y, x + width // 4, y + height // 3), fill=COLORS[phrase])
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=90)
                caption = "a " + " and a ".join(phrases) + " on a table"
                key = f"{number:05d}{k:04d}"
                members = {"jpg": buffer.getvalue(), "txt": caption.encode(), "json": json.dumps({"key": key}).encode()}
                for extension, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    return folder


class TimedProgress:
    """A quiet `BuildProgress` that keeps when the first sample came back."""

    def __init__(self, shards: int):
        from msdiffusion.data.build import BuildProgress

        self.inner = BuildProgress(shards, quiet=True)
        self.started = time.perf_counter()
        self.first: float | None = None

    def resume(self, reports) -> None:
        self.inner.resume(reports)

    def add_samples(self, count: int) -> None:
        if self.first is None:
            self.first = time.perf_counter() - self.started
        self.inner.add_samples(count)

    def shard_done(self, report) -> None:
        self.inner.shard_done(report)

    def close(self) -> None:
        self.inner.close()


def manifest_lines(out: Path) -> list[str]:
    from msdiffusion.data.manifest import manifest_files

    return sorted(line for path in manifest_files(out) for line in path.read_text().splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=4, help="tar shards (default 4)")
    parser.add_argument("--per-shard", type=int, default=40, help="samples per shard (default 40)")
    parser.add_argument("--size", default="512x384", help="image size WxH (default 512x384)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per detector/segmenter batch (default 8)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each engine, taking turns (default 1)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs given to the local Ray (default 2)")
    parser.add_argument("--no-masks", action="store_true", help="detector only, no SAM")
    parser.add_argument("--folder", type=Path, help="work folder (default: a temporary one, removed afterwards)")
    args = parser.parse_args(argv)
    if min(args.shards, args.per_shard, args.batch_size, args.repeats) < 1:
        parser.error("--shards, --per-shard, --batch-size and --repeats must be at least 1")
    width, height = (int(v) for v in args.size.lower().split("x"))

    import torch
    from tiny_detectors import save_tiny_detector_and_segmenter

    from msdiffusion.data.build import ModelSpec, build_sharded, make_phrase_finder, plan_shards
    from msdiffusion.data.detection import SubjectFilter
    from msdiffusion.data.ray_engine import build_with_ray, ray_available

    if not ray_available():
        parser.error('Ray Data is not installed: pip install -e ".[scale]"')
    import ray

    with tempfile.TemporaryDirectory() as temporary:
        folder = args.folder or Path(temporary)
        source = make_shards(folder / "tars", args.shards, args.per_shard, (width, height))
        models = save_tiny_detector_and_segmenter(folder / "models")
        detector = ModelSpec("detector", str(models["detector"]), "cpu", "fp32", args.batch_size)
        segmenter = None if args.no_masks else ModelSpec("segmenter", str(models["segmenter"]), "cpu", "fp32")
        # Loose filters: the random tiny detector's boxes are kept, so every stage, masks included, has work.
        rules = SubjectFilter(score_threshold=0.0, min_box_area=0.001, max_box_area=1.0, max_overlap=1.0)
        find_phrases = make_phrase_finder()
        specs, _ = plan_shards(source)
        samples = args.shards * args.per_shard
        print(
            f"{samples} samples ({args.shards} tar shards of {args.per_shard} JPEGs of {width}x{height}), "
            f"masks: {segmenter is not None}, batch size {args.batch_size}; torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), ray {ray.__version__}, {time.strftime('%Y-%m-%d')}",
            flush=True,
        )

        runs: dict[str, list[tuple[float, float]]] = {}  # name -> (seconds, first sample at) per repeat
        notes: dict[str, str] = {}
        manifests: dict[str, list[str]] = {}

        def local(out: Path, progress: TimedProgress) -> None:
            loaded_segmenter = segmenter() if segmenter else None
            build_sharded(
                specs,
                out,
                detector(),
                rules,
                find_phrases,
                loaded_segmenter,
                batch_size=args.batch_size,
                progress=progress,
            )

        def on_ray(workers: int):
            # CPU shares sized so the detector and segmenter actors take 1 of the 2 CPUs together, leaving the
            # rest to the readers and writers (a pool that takes every CPU leaves the readers none: no progress).
            cpus = 1.0 / (workers * (1 if segmenter is None else 2))

            def run(out: Path, progress: TimedProgress) -> None:
                build_with_ray(
                    specs,
                    out,
                    detector,
                    rules,
                    find_phrases,
                    segmenter,
                    batch_size=args.batch_size,
                    detector_workers=workers,
                    segmenter_workers=workers,
                    gpus_per_worker=0.0,
                    cpus_per_worker=cpus,
                    progress=progress,
                )

            actors = f"{workers} detector + {workers if segmenter else 0} segmenter actor(s), {cpus:g} CPU each"
            return run, actors

        variants = {"local": (local, "this process, the models loaded once")}
        for workers in (1, 2):
            variants[f"ray, {workers} worker(s)"] = on_ray(workers)

        start = time.perf_counter()
        ray.init(
            num_cpus=args.num_cpus,
            object_store_memory=200 * 1024**2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
        print(f"  ray start: {time.perf_counter() - start:.1f} s (not in the Ray rates)", flush=True)
        try:
            for repeat in range(args.repeats):
                for k, (name, (run, note)) in enumerate(variants.items()):
                    out = folder / "out" / f"{repeat}-{k}"
                    progress = TimedProgress(len(specs))
                    start = time.perf_counter()
                    run(out, progress)
                    seconds = time.perf_counter() - start
                    runs.setdefault(name, []).append((seconds, progress.first or float("nan")))
                    notes[name] = note
                    manifests.setdefault(name, manifest_lines(out))
                    print(f"  {name}: {seconds:.1f} s, {samples / seconds:.2f} samples/s ({note})", flush=True)
        finally:
            ray.shutdown()

    reference = manifests["local"]
    same = all(lines == reference for lines in manifests.values())
    print(f"\nsame manifest lines in every run: {'yes' if same else 'NO'} ({len(reference)} samples kept)")
    print("| engine | seconds (median) | samples/s | / local | first sample back after |")
    print("| --- | --- | --- | --- | --- |")
    medians = {
        name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)) for name, rs in runs.items()
    }
    local_rate = samples / medians["local"][0]
    for name, (seconds, first) in medians.items():
        rate = samples / seconds
        print(f"| {name} ({notes[name]}) | {seconds:.1f} | {rate:.2f} | {rate / local_rate:.2f}x | {first:.1f} s |")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
