"""Atomic checkpoints: round trip, retention, and a half-written directory is never loaded."""

import random

import numpy as np
import torch

from zerorl.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def test_round_trip_and_retention(tmp_path):
    model = torch.nn.Linear(3, 2)
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, {"model": model.state_dict()}, {"step": step, "data_cursor": step * 4},
                        keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000020", "step-000030"]
    tensors, state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state == {"step": 30, "data_cursor": 120}
    assert torch.equal(tensors["model"]["weight"], model.weight)


def test_half_written_checkpoint_is_ignored(tmp_path):
    save_checkpoint(tmp_path, 5, {"model": {"w": torch.ones(2)}}, {"step": 5}, keep=3)
    # What a kill in the middle of a write leaves behind: a temp dir and a dir without its state file.
    (tmp_path / ".tmp-step-000010-123").mkdir()
    (tmp_path / ".tmp-step-000010-123" / "model.pt").write_bytes(b"\x00garbage")
    (tmp_path / "step-000010").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-000005"
    _, state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["step"] == 5


def test_rng_state_round_trip():
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
