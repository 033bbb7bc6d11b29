"""Test-only fault injection for the crash tests, loaded into their subprocesses (accelerate's workers
included) by putting this folder on PYTHONPATH: Python imports `sitecustomize` at start-up.

With MSDIFFUSION_TEST_PAUSE="POINT@STEP" (or "POINT@STEP:PROCESS"), the run creates the file named by
MSDIFFUSION_TEST_PAUSE_FILE when it reaches POINT at STEP and waits until that file is deleted, so that
a test can kill it at that exact moment. The points wrap the training code's own calls, which stays
free of test hooks:
- "step": after the optimizer step's log line (the tests log every step), before any checkpoint;
- within a save: "begin" (the partial folder exists, nothing written), "hook" (the adapter exported,
  optimizer and random states not yet written), "written" (this process's part written), "marked"
  (the state file written, the folder not yet renamed), "renamed" (renamed, older checkpoints not
  yet removed);
- in `msdiff data cache`: "shard" (shard STEP written under its temporary name, not yet renamed).
"""

import os

PAUSE_ENV = "MSDIFFUSION_TEST_PAUSE"
PAUSE_FILE_ENV = "MSDIFFUSION_TEST_PAUSE_FILE"
POINTS = ("step", "begin", "hook", "written", "marked", "renamed", "shard")


def _pause(point: str, step: int) -> None:
    import time
    from pathlib import Path

    wanted = os.environ[PAUSE_ENV]
    where, _, process = wanted.partition(":")
    name, _, at = where.partition("@")
    if name not in POINTS or not at.isdigit():
        raise ValueError(f"{PAUSE_ENV}={wanted!r}: expected POINT@STEP[:PROCESS] with POINT one of {', '.join(POINTS)}")
    if name != point or int(at) != step or (process and int(process) != int(os.environ.get("RANK", "0"))):
        return
    flag = Path(os.environ[PAUSE_FILE_ENV])
    flag.write_text(f"{os.getpid()}\n")
    deadline = time.monotonic() + 600  # a test that forgot to release it does not hang forever
    while flag.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def _step_of(path) -> int:
    """The step of a checkpoint folder or cache shard path (`checkpoint-6.partial`, `.shard-00001...`)."""
    import re

    found = re.search(r"(?:checkpoint|shard)-0*(\d+)", str(path))
    return int(found.group(1)) if found else -1  # another call (the final export): no pause point


def _after(owner, name: str, point: str, step_of) -> None:
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        _pause(point, step_of(*args, **kwargs))
        return result

    setattr(owner, name, wrapped)


def _install() -> None:
    import accelerate
    import safetensors.torch

    import msdiffusion.train.loop as loop

    save_state = accelerate.Accelerator.save_state

    def saving(self, output_dir=None, **kwargs):
        _pause("begin", _step_of(output_dir))
        result = save_state(self, output_dir, **kwargs)
        _pause("written", _step_of(output_dir))
        return result

    accelerate.Accelerator.save_state = saving
    _after(loop.TrainingRun, "_log", "step", lambda self, window, step, *a, **k: step)
    _after(loop.TrainingRun, "export", "hook", lambda self, folder, *a, **k: _step_of(folder))
    _after(loop, "write_state", "marked", lambda folder, state: state["step"])
    _after(loop, "replace_path", "renamed", lambda source, destination: _step_of(destination))
    # `msdiff data cache` imports save_file when it writes: the library's own function is wrapped
    _after(safetensors.torch, "save_file", "shard", lambda tensors, path, *a, **k: _step_of(path))


if os.environ.get(PAUSE_ENV):
    _install()
