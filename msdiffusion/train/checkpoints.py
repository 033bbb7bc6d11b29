"""Training checkpoints that are either complete or ignored, whatever moment a run is killed at.

A checkpoint of step N is written by every process into `checkpoint-N.partial/`. When all of them
have written and flushed their part, the main process writes `train_state.json` last (the step,
the number of processes, and the size of every file of the checkpoint), then renames the folder
to `checkpoint-N/`. So a `checkpoint-N` folder is complete by construction, and its state file
lets a reader check that nothing was lost or truncated since. Older checkpoints are removed only
after the new one is in place.

Folders written before this scheme (no file list in their state) are checked by the files every
save wrote last.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..atomic import fsync_tree, write_text_atomic

CHECKPOINT_PREFIX = "checkpoint-"
PARTIAL_SUFFIX = ".partial"  # a checkpoint being written, or whose save was interrupted
STATE_FILE = "train_state.json"  # written last: a checkpoint without it never finished


class IncompleteCheckpointError(FileNotFoundError):
    """A checkpoint folder whose save did not finish (or whose files were lost since)."""


def checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"


def partial_path(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}{PARTIAL_SUFFIX}"


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """N for `checkpoint-N` and `checkpoint-N.partial` folders, else None."""
    name = Path(path).name.removesuffix(PARTIAL_SUFFIX)
    number = name[len(CHECKPOINT_PREFIX) :]
    return int(number) if name.startswith(CHECKPOINT_PREFIX) and number.isdigit() else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """`checkpoint-N` folders of a run (complete or not), oldest first; not the `.partial` ones."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        p
        for p in output_dir.iterdir()
        if p.is_dir() and not p.name.endswith(PARTIAL_SUFFIX) and checkpoint_step(p) is not None
    ]
    return sorted(found, key=checkpoint_step)


def partial_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """`checkpoint-N.partial` folders: saves in progress, or interrupted."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        p
        for p in output_dir.iterdir()
        if p.is_dir() and p.name.endswith(PARTIAL_SUFFIX) and checkpoint_step(p) is not None
    ]
    return sorted(found, key=checkpoint_step)


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """None if `path` is a complete checkpoint, else why not (for messages)."""
    path = Path(path)
    if path.name.endswith(PARTIAL_SUFFIX):
        return "its save was interrupted (a .partial folder is renamed only when complete)"
    state_file = path / STATE_FILE
    if not state_file.is_file():
        return f"no {STATE_FILE}: its save did not finish"
    try:
        state = json.loads(state_file.read_text())
        step, num_processes = int(state["step"]), int(state["num_processes"])
    except (ValueError, KeyError, TypeError):
        return f"{STATE_FILE} is unreadable"
    files = state.get("files")
    if files is None:  # written before checkpoints recorded their files: those every save wrote last
        expected = ["optimizer.bin", "scheduler.bin"]
        expected += [f"random_states_{i}.pkl" for i in range(num_processes)]
        expected += [f"generator_{i}.pt" for i in range(num_processes)]
        missing = [name for name in expected if not (path / name).is_file()]
        return f"missing {', '.join(missing)}: its save did not finish" if missing else None
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written (a damaged copy?)"
    if checkpoint_step(path) is not None and checkpoint_step(path) != step:
        return f"{STATE_FILE} says step {step}, the folder's name another"
    return None


def find_checkpoints(output_dir: str | os.PathLike) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(complete checkpoints oldest first, [(incomplete folder, why)] oldest first) of a run."""
    complete, incomplete = [], []
    for path in sorted(list_checkpoints(output_dir) + partial_checkpoints(output_dir), key=checkpoint_step):
        problem = checkpoint_problem(path)
        if problem is None:
            complete.append(path)
        else:
            incomplete.append((path, problem))
    return complete, incomplete


def check_checkpoint(path: str | os.PathLike) -> Path:
    """`path` if it is a complete checkpoint; else a clear `FileNotFoundError` (`IncompleteCheckpointError`)."""
    path = Path(path)
    if not path.is_dir() or (not (path / STATE_FILE).is_file() and checkpoint_step(path) is None):
        raise FileNotFoundError(
            f"resume_from_checkpoint: {path} is not a training checkpoint (no {STATE_FILE}); give a "
            f"{CHECKPOINT_PREFIX}N folder of a run, or 'latest'"
        )
    problem = checkpoint_problem(path)
    if problem is not None:
        raise IncompleteCheckpointError(
            f"resume_from_checkpoint: {path} is incomplete ({problem}). Resume from an earlier checkpoint, "
            "or with 'latest', which takes the newest complete one"
        )
    return path


def write_state(folder: Path, state: dict[str, Any]) -> None:
    """Flush every file of `folder`, then write its state file last, listing those files and their sizes."""
    fsync_tree(folder)
    files = {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != STATE_FILE
    }
    write_text_atomic(folder / STATE_FILE, json.dumps({**state, "files": files}, indent=2) + "\n")
