"""`msdiff data build --engine ray`: the build's stages as a Ray Data pipeline, on one machine or a cluster.

    shards ──read + decode (CPU tasks)──▶ detect (actor pool) ──▶ segment (actor pool) ──▶ write (CPU tasks)
                                                                                             │
                                 the driver: a shard's lines, in item order, once all are in ◀┘

The stages are `build.py`'s own functions (`shard_works`, `load_stage`, `detect_stage`,
`segment_stage`, `write_stage`), so both engines write the same manifest. Rows carry a pickled
`Work` (decoded images until the write stage, a manifest line after it). Each shard also sends an
end row with its item count, which lets the driver finish a shard (`finish_shard`) as soon as its
last item is written, in whatever order rows arrive: a stopped build keeps its finished shards.

Fault tolerance: Ray streams (bounded memory) and loads each model once per actor. A CPU task whose
worker process dies is run again (`TASK_RETRIES`); an actor that dies (killed, out of memory, its
machine gone) is restarted and its batches in flight are sent again (`ACTOR_TASK_RETRIES` per batch),
so the build still comes out complete. The driver keeps one row per (shard, position), so a row sent
twice by a retry cannot duplicate a sample. A stopped driver loses only its unfinished shards. The output
folder must be one that every worker writes to (a local disk for a one-machine build, a shared file
system on a cluster); the sources may be any fsspec URL the workers can read.
"""

from __future__ import annotations

import inspect
import os
import pickle
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .build import (
    BuildProgress,
    BuildReport,
    ShardSpec,
    Work,
    detect_stage,
    finish_build,
    finish_shard,
    finished_shards,
    load_stage,
    segment_stage,
    shard_works,
    write_stage,
)
from .detection import SubjectFilter

END = -1  # `position` of a shard's end row; its payload is the shard's item count
# Writing is mostly waiting on the disk: half a CPU lets it run beside the readers on a small machine.
WRITE_CPUS = 0.5
# Retries after a worker process dies (not after an error raised by the code: that is a bug to see).
# Bounded, so a batch that kills its worker every time (a decoder crash, out of memory) stops the
# build with Ray's error instead of looping; actors restart without limit, as a long build on
# preemptible machines may lose each of them more than once.
TASK_RETRIES = 4
ACTOR_TASK_RETRIES = 4
ACTOR_RESTARTS = -1


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        return False
    return True


def build_with_ray(
    specs: Sequence[ShardSpec],
    out_dir: str | os.PathLike,
    detector: Callable[[], Any],
    rules: SubjectFilter,
    find_phrases: Callable[[str], list[str]],
    segmenter: Callable[[], Any] | None = None,
    batch_size: int = 8,
    min_subjects: int = 1,
    save_crops: bool = False,
    address: str | None = None,
    detector_workers: int = 1,
    segmenter_workers: int | None = None,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float = 1.0,
    init_kwargs: dict[str, Any] | None = None,
    progress: BuildProgress | None = None,
) -> BuildReport:
    """Build a sharded manifest in `out_dir` on Ray; shards finished by an earlier run are skipped.

    `detector()` and `segmenter()` load the models (e.g. `build.ModelSpec`); each actor calls them
    once. Without `address` (and no Ray started in this process) a local Ray starts on this machine
    with `init_kwargs` (e.g. num_cpus); with one, this joins that cluster. A Ray started here is
    shut down at the end. `gpus_per_worker` None: 1 where the cluster has GPUs, else 0.
    """
    if not ray_available():
        raise ImportError('the ray engine needs Ray Data: pip install "msdiffusion[scale]" (or "ray[data]")')
    import ray
    import ray.data

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reports = finished_shards(out_dir, specs)
    if progress is not None:
        progress.resume(reports.values())
    todo = [spec for spec in specs if spec.number not in reports]
    started = False
    context = ray.data.DataContext.get_current()
    ray_bars = context.enable_progress_bars
    try:
        if progress is not None:
            context.enable_progress_bars = False  # one progress line: ours, which counts shards and the time left
        if todo and not ray.is_initialized():
            ray.init(address=address, **(init_kwargs or {}))
            started = True
        if todo:
            if gpus_per_worker is None:
                gpus_per_worker = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
            by_number = {spec.number: spec for spec in todo}
            for number, works in _run(
                todo,
                out_dir,
                detector,
                rules,
                find_phrases,
                segmenter,
                batch_size,
                min_subjects,
                save_crops,
                detector_workers,
                segmenter_workers or detector_workers,
                gpus_per_worker,
                cpus_per_worker,
                progress,
            ):
                reports[number] = finish_shard(out_dir, by_number[number], works)
                if progress is not None:
                    progress.shard_done(reports[number])
    finally:
        context.enable_progress_bars = ray_bars
        if started:
            ray.shutdown()
    if progress is not None:
        progress.close()
    finish_build(out_dir, specs, reports)
    return BuildReport.total(reports.values())


def _run(
    todo,
    out_dir,
    detector,
    rules,
    find_phrases,
    segmenter,
    batch_size,
    min_subjects,
    save_crops,
    detector_workers,
    segmenter_workers,
    gpus_per_worker,
    cpus_per_worker,
    progress,
):
    """Yield (shard number, its works) as each shard's last item comes out of the pipeline."""
    import ray.data

    # One block per shard, so shards are read by parallel tasks.
    dataset = ray.data.from_items([{"spec": pickle.dumps(spec)} for spec in todo], override_num_blocks=len(todo))
    task_retries = _remote_args(dataset.flat_map, max_retries=TASK_RETRIES)
    actor = dict(batch_size=batch_size, batch_format="numpy", num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)
    actor.update(_remote_args(dataset.map_batches, max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_TASK_RETRIES))
    with warnings.catch_warnings():
        # Ray 2.60 warns that remote arguments given as keywords will go, but has no other way to set retries.
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
        dataset = dataset.flat_map(_read_shard, **task_retries)
        dataset = dataset.map_batches(
            _DetectActor,
            fn_constructor_kwargs=dict(
                detector=detector, rules=rules, find_phrases=find_phrases, min_subjects=min_subjects
            ),
            compute=ray.data.ActorPoolStrategy(size=detector_workers),
            **actor,
        )
        if segmenter is not None:
            dataset = dataset.map_batches(
                _SegmentActor,
                fn_constructor_kwargs=dict(segmenter=segmenter),
                compute=ray.data.ActorPoolStrategy(size=segmenter_workers),
                **actor,
            )
        dataset = dataset.map_batches(
            _write,
            fn_kwargs=dict(out_dir=str(out_dir), save_crops=save_crops),
            batch_size=batch_size,
            batch_format="numpy",
            num_cpus=WRITE_CPUS,
            **task_retries,
        )

    # Keyed by position: a row that a retried task sends again is dropped, not counted twice.
    works: dict[int, dict[int, Work]] = defaultdict(dict)
    expected: dict[int, int] = {}
    finished: set[int] = set()
    for row in dataset.iter_rows():
        number, position = int(row["shard"]), int(row["position"])
        if number in finished:
            continue
        if position == END:
            expected[number] = pickle.loads(row["payload"])
        elif position not in works[number]:
            works[number][position] = pickle.loads(row["payload"])
            if progress is not None:
                progress.add_samples(1)
        if expected.get(number) == len(works[number]):
            finished.add(number)
            expected.pop(number)
            yield number, list(works.pop(number, {}).values())


def _remote_args(method: Callable, **retries: int) -> dict[str, int]:
    """`retries` while `method` takes Ray remote arguments as keywords; else none, leaving Ray's defaults."""
    accepts = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(method).parameters.values())
    return retries if accepts else {}


def _read_shard(row: dict) -> list[dict]:
    """CPU task: a shard's items, their images decoded (`load_stage`), then the shard's end row."""
    spec: ShardSpec = pickle.loads(row["spec"])
    rows, count = [], 0
    for work in shard_works(spec):
        load_stage([work])
        rows.append(_row(spec.number, work))
        count += 1
    rows.append({"shard": spec.number, "position": END, "payload": pickle.dumps(count)})
    return rows


def _row(number: int, work: Work) -> dict:
    return {"shard": number, "position": work.position, "payload": pickle.dumps(work)}


class _Stage:
    """Unpickle a batch's works, run a stage on them, pickle them back; end rows pass through."""

    def run(self, works: list[Work]) -> None:
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        positions = batch["position"]
        keep = [k for k, position in enumerate(positions) if position != END]
        works = [pickle.loads(batch["payload"][k]) for k in keep]
        self.run(works)
        payload = list(batch["payload"])
        for k, work in zip(keep, works):
            payload[k] = pickle.dumps(work)
        out = np.empty(len(payload), dtype=object)
        out[:] = payload
        return {"shard": batch["shard"], "position": positions, "payload": out}


class _DetectActor(_Stage):
    def __init__(self, detector, rules, find_phrases, min_subjects):
        self.detector = detector()  # once per actor: the model stays loaded for every batch
        self.rules, self.find_phrases, self.min_subjects = rules, find_phrases, min_subjects

    def run(self, works: list[Work]) -> None:
        detect_stage(works, self.detector, self.rules, self.find_phrases, self.min_subjects)


class _SegmentActor(_Stage):
    def __init__(self, segmenter):
        self.segmenter = segmenter()

    def run(self, works: list[Work]) -> None:
        segment_stage(works, self.segmenter)


class _WriteStage(_Stage):
    def __init__(self, out_dir: str, save_crops: bool):
        self.out_dir, self.save_crops = out_dir, save_crops

    def run(self, works: list[Work]) -> None:
        write_stage(works, self.out_dir, self.save_crops)


def _write(batch: dict[str, np.ndarray], out_dir: str, save_crops: bool) -> dict[str, np.ndarray]:
    return _WriteStage(out_dir, save_crops)(batch)
