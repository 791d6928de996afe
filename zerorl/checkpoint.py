"""Atomic checkpoints and exact resume.

A checkpoint is a directory ``checkpoints/step-000050/`` holding the model, optimizer and scheduler
states, every RNG state (torch, numpy, python) and the trainer state (step, data cursor). It is
written into a temporary sibling directory, flushed to disk, then renamed: a rename within one
file system is atomic, so a kill at any moment leaves either the previous checkpoint or the new
one, never a half-written directory under a checkpoint's name.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_PREFIX = "step-"
TRAINER_STATE = "trainer_state.json"


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


def save_checkpoint(checkpoint_root: str | Path, step: int, tensors: dict[str, Any],
                    trainer_state: dict[str, Any], keep: int) -> Path:
    """Write ``tensors`` (state dicts, RNG) and ``trainer_state`` (JSON) atomically; keep the last ``keep``."""
    root = Path(checkpoint_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, obj in tensors.items():
        with open(tmp / f"{name}.pt", "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
    with open(tmp / TRAINER_STATE, "w") as handle:
        json.dump(trainer_state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it atomically too
        old = root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    for stale in list_checkpoints(root)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    # Leftovers of runs killed mid-write are never loaded (they lack the prefix); tidy them up.
    for leftover in root.glob(".tmp-*"):
        if leftover != tmp:
            shutil.rmtree(leftover, ignore_errors=True)
    return final


def list_checkpoints(checkpoint_root: str | Path) -> list[Path]:
    root = Path(checkpoint_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(checkpoint_root: str | Path) -> Path | None:
    found = list_checkpoints(checkpoint_root)
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (tensors by name, trainer_state)."""
    path = Path(path)
    state = json.loads((path / TRAINER_STATE).read_text())
    tensors = {p.stem: torch.load(p, map_location="cpu", weights_only=False) for p in path.glob("*.pt")}
    return tensors, state
