"""Atomic checkpoints and exact resume.

A checkpoint is a directory ``checkpoints/step-000050/`` holding the model, optimizer and scheduler
states, every RNG state (torch, numpy, python) and the trainer state (step, data cursor). It is
written into a temporary sibling directory, flushed to disk, then renamed: a rename within one
file system is atomic, so a kill at any moment leaves either the previous checkpoint or the new
one, never a half-written directory under a checkpoint's name.

Why each file is written in this order: the ``.pt`` files, then ``manifest.json`` (their sizes), then
``trainer_state.json`` last. A directory counts as a checkpoint only when its trainer state exists, and
``load_checkpoint`` compares every file against the manifest, so even a copy truncated by hand (or by a
full disk that fsync did not catch) is refused with a message instead of being half-loaded.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_PREFIX = "step-"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
# Test hook: seconds to sleep after each file of a checkpoint, so a test can SIGKILL a run mid-write.
SLOW_CHECKPOINT_ENV = "ZERORL_TEST_SLOW_CHECKPOINT"


class CheckpointError(RuntimeError):
    """A checkpoint directory is incomplete or damaged (the message names the file)."""


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, write) -> None:
    with open(path, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    pause = float(os.environ.get(SLOW_CHECKPOINT_ENV, "0") or 0)
    if pause > 0:
        time.sleep(pause)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a reader (or a resume after a kill) sees the old or the new
    content, never a truncated file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _write_synced(tmp, lambda handle: handle.write(text.encode()))
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _step_of(path: Path) -> int | None:
    suffix = path.name[len(CHECKPOINT_PREFIX):]
    return int(suffix) if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def _recover_interrupted_replace(root: Path) -> None:
    """Re-saving an existing step moves the old directory to ``.old-step-N-PID`` for the instant between
    two renames; a kill in that instant leaves no ``step-N``. Put the old one back."""
    for old in root.glob(f".old-{CHECKPOINT_PREFIX}*"):
        name = old.name[len(".old-"):].rsplit("-", 1)[0]
        target = root / name
        if (old / TRAINER_STATE).is_file() and not target.exists():
            os.rename(old, target)
        else:
            shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(checkpoint_root: str | Path, step: int, tensors: dict[str, Any],
                    trainer_state: dict[str, Any], keep: int) -> Path:
    """Write ``tensors`` (state dicts, RNG) and ``trainer_state`` (JSON) atomically; keep the last ``keep``."""
    root = Path(checkpoint_root)
    root.mkdir(parents=True, exist_ok=True)
    _recover_interrupted_replace(root)
    final = root / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    sizes = {}
    for name, obj in tensors.items():
        _write_synced(tmp / f"{name}.pt", lambda handle, obj=obj: torch.save(obj, handle))
        sizes[f"{name}.pt"] = (tmp / f"{name}.pt").stat().st_size
    _write_synced(tmp / MANIFEST, lambda handle: handle.write(json.dumps({"files": sizes}).encode()))
    _write_synced(tmp / TRAINER_STATE, lambda handle: handle.write(json.dumps(trainer_state).encode()))
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step: replace it atomically too (see _recover_interrupted_replace)
        old = root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    for stale in list_checkpoints(root)[:-keep]:
        # Rename first: a kill in the middle of rmtree must not leave a half-deleted "step-N" behind.
        doomed = root / f".del-{stale.name}-{os.getpid()}"
        os.rename(stale, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    # Leftovers of runs killed mid-write are never loaded (they lack the prefix); tidy them up.
    for pattern in (".tmp-*", ".del-*"):
        for leftover in root.glob(pattern):
            if leftover != tmp:
                shutil.rmtree(leftover, ignore_errors=True)
    return final


def list_checkpoints(checkpoint_root: str | Path) -> list[Path]:
    """Complete checkpoint directories (those with a trainer state), oldest first."""
    root = Path(checkpoint_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=_step_of)


def latest_checkpoint(checkpoint_root: str | Path) -> Path | None:
    root = Path(checkpoint_root)
    if root.is_dir():
        _recover_interrupted_replace(root)
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (tensors by name, trainer_state); ``CheckpointError`` when a file is missing or damaged."""
    path = Path(path)
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r}: cannot read {TRAINER_STATE} ({error})") from error
    manifest_path = path / MANIFEST
    if manifest_path.is_file():  # checkpoints written before the manifest existed are loaded as they are
        expected = json.loads(manifest_path.read_text())["files"]
        for name, size in expected.items():
            file = path / name
            if not file.is_file() or file.stat().st_size != size:
                found = file.stat().st_size if file.is_file() else "missing"
                raise CheckpointError(f"checkpoint {str(path)!r}: {name} should hold {size} bytes, found {found}. "
                                      "Fix: delete this directory to resume from the previous checkpoint.")
    tensors = {}
    for file in sorted(path.glob("*.pt")):
        try:
            # weights_only=False: the RNG states are numpy/python objects; the file is our own output.
            tensors[file.stem] = torch.load(file, map_location="cpu", weights_only=False)
        except Exception as error:
            raise CheckpointError(f"checkpoint {str(path)!r}: {file.name} cannot be loaded ({error}). "
                                  "Fix: delete this directory to resume from the previous checkpoint.") from error
    return tensors, state
