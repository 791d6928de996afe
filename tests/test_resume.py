"""Exact resume with real processes and real kills.

A run is started with ``python -m zerorl.cli train``, killed with SIGKILL, and continued with
``--resume``; its final weights must equal, bit for bit, those of a run that was never interrupted.
Kills during a checkpoint write must leave the previous checkpoint loadable. The model is a tiny random
Qwen2, the reward a digit-fraction score (different for every completion, so every step moves the
weights), and each run is mostly interpreter start-up (~5 s at one thread).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from zerorl.checkpoint import (
    SLOW_CHECKPOINT_ENV,
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
)
from zerorl.lm.models import build_tiny_model
from zerorl.lm.runtime import restore_training_state

MAX_STEPS = 12
REWARD_FILE = '''
def accuracy(prompts, completions, **kwargs):
    """Fraction of digits: a dense score that differs between completions."""
    return [sum(ch.isdigit() for ch in text) / max(1, len(text)) for text in completions]
'''
# Timings differ between runs; everything else in a metrics row must match.
TIMING_KEYS = ("time/", "step_time", "tokens_per_second")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = build_tiny_model(root / "tiny", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, seed=3)
    (root / "reward.py").write_text(REWARD_FILE)
    reference = root / "reference"
    _run(root, reference).check_returncode()
    return SimpleNamespace(root=root, model=model, reference=reference)


def _command(root: Path, out: Path, resume: bool = False) -> list[str]:
    args = [sys.executable, "-m", "zerorl.cli", "train", "--output-dir", str(out)]
    if resume:  # the saved config.yaml is the run's truth: no other flags
        return args + ["--resume"]
    return args + [
        "--model", str(root / "tiny"), "--max-steps", str(MAX_STEPS), "template=compact",
        f"reward_funcs=[{root / 'reward.py'}:accuracy, format]", "prompts_per_step=4", "num_generations=4",
        "max_completion_length=12", "learning_rate=1e-2", "warmup_steps=2", "lr_scheduler_type=cosine",
        "num_eval=4", "eval_samples_per_prompt=2", "save_steps=2", "save_total_limit=2", "num_threads=1",
        "plots=false", "progress=false",
    ]


def _env(**extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", **extra)


def _run(root, out, resume=False, **env) -> subprocess.CompletedProcess:
    return subprocess.run(_command(root, out, resume), env=_env(**env), capture_output=True, text=True, timeout=300)


def _start_and_kill(command, env, ready) -> None:
    """Start a process, SIGKILL it as soon as ``ready()`` holds (or when it has finished anyway)."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while process.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.002)
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()


def _metric_lines(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _assert_same_final_weights(out: Path, reference: Path) -> None:
    got, want = load_file(out / "final" / "model.safetensors"), load_file(reference / "final" / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def _comparable_metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(TIMING_KEYS)} for row in rows]


def test_reference_run_learns_something(setup):
    """Guards the tests below: if training did not move the weights, 'bitwise equal' would be vacuous."""
    start = load_file(setup.model / "model.safetensors")
    final = load_file(setup.reference / "final" / "model.safetensors")
    changed = [name for name in start if not torch.equal(start[name], final[name])]
    assert len(changed) >= len(start) - 1, changed  # every trained tensor moved
    steps = [row["step"] for row in _comparable_metrics(setup.reference)]
    assert steps == list(range(1, MAX_STEPS + 1))


def test_two_sigkills_then_resume_is_bitwise_exact(setup, tmp_path):
    out = tmp_path / "run"
    # Kill 1 lands mid-step 6 (after the step-4 checkpoint: steps 5-6 are replayed); kill 2 mid-step 10,
    # in the resumed process. Then the run finishes.
    _start_and_kill(_command(setup.root, out), _env(), lambda: _metric_lines(out) >= 5)
    assert 1 <= _metric_lines(out) < MAX_STEPS, "the first kill must land inside the training loop"
    _start_and_kill(_command(setup.root, out, resume=True), _env(), lambda: _metric_lines(out) >= 9)
    assert _metric_lines(out) < MAX_STEPS
    finished = _run(setup.root, out, resume=True)
    assert finished.returncode == 0, finished.stderr[-2000:]

    _assert_same_final_weights(out, setup.reference)
    # metrics.jsonl was truncated to the checkpoint on each resume: every step once, same values.
    assert _comparable_metrics(out) == _comparable_metrics(setup.reference)
    summary = json.loads((out / "summary.json").read_text())
    reference = json.loads((setup.reference / "summary.json").read_text())
    for label in ("eval_before", "eval_after"):  # eval_before was kept in the checkpoints, not recomputed
        summary[label].pop("seconds"), reference[label].pop("seconds")
        assert summary[label] == reference[label]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-000010", "step-000012"]
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(setup, tmp_path):
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"

    def writing_the_second_checkpoint() -> bool:
        # A temporary directory with some (not all) files, while step-000002 is already complete.
        partial = [p for p in checkpoints.glob(".tmp-step-*") if any(p.iterdir())] if checkpoints.is_dir() else []
        return bool(partial) and (checkpoints / "step-000002").is_dir() and "000004" in partial[0].name

    # Sleep 0.25 s after each checkpoint file, so the kill lands between files of step-000004.
    _start_and_kill(_command(setup.root, out), _env(**{SLOW_CHECKPOINT_ENV: "0.25"}), writing_the_second_checkpoint)
    partial = list(checkpoints.glob(".tmp-step-000004-*"))
    assert partial and not (partial[0] / "trainer_state.json").exists(), "the kill must land mid-write"
    latest = latest_checkpoint(checkpoints)
    assert latest.name == "step-000002"
    tensors, state = load_checkpoint(latest)
    assert state["step"] == 2 and state["data_cursor"] == 8
    assert set(tensors) >= {"model", "optimizer", "scheduler", "rng", "ref_model"}

    finished = _run(setup.root, out, resume=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    _assert_same_final_weights(out, setup.reference)
    assert not list(checkpoints.glob(".tmp-*")), "leftovers of the killed write are tidied up"


# ------------------------------------------------------------------------------------------------
# The crash windows a random kill rarely hits, made to happen on purpose.
# ------------------------------------------------------------------------------------------------

def test_kill_between_the_two_renames_of_a_replace_is_recovered(tmp_path):
    save_checkpoint(tmp_path, 4, {"model": {"w": torch.ones(2)}}, {"step": 4}, keep=2)
    # Re-saving step 4 renames step-000004 → .old-step-000004-PID, then the new one into place; a kill
    # in between leaves only the .old directory.
    os.rename(tmp_path / "step-000004", tmp_path / ".old-step-000004-999")
    assert latest_checkpoint(tmp_path).name == "step-000004"
    assert load_checkpoint(tmp_path / "step-000004")[1] == {"step": 4}


def test_retention_never_leaves_a_half_deleted_checkpoint(tmp_path, monkeypatch):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, {"model": {"w": torch.full((2,), float(step))}}, {"step": step}, keep=2)
    import shutil

    real_rmtree = shutil.rmtree
    deleted = []

    def rmtree_killed_halfway(path, ignore_errors=False):
        deleted.append(Path(path).name)
        (Path(path) / "model.pt").unlink(missing_ok=True)  # the process dies after the first file is gone

    monkeypatch.setattr(shutil, "rmtree", rmtree_killed_halfway)
    save_checkpoint(tmp_path, 3, {"model": {"w": torch.full((2,), 3.0)}}, {"step": 3}, keep=2)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert deleted[0].startswith(".del-step-000001")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000003"]
    for path in list_checkpoints(tmp_path):
        load_checkpoint(path)  # every directory that looks like a checkpoint is complete


def test_truncated_checkpoint_is_refused_and_resume_falls_back(tmp_path, capsys):
    model = torch.nn.Linear(3, 2)
    for step in (2, 4):
        with torch.no_grad():
            model.weight.fill_(float(step))
        save_checkpoint(tmp_path, step, {"model": model.state_dict(), "optimizer": {}, "scheduler": {},
                                         "rng": rng_state()},
                        {"step": step, "data_cursor": step * 4}, keep=2)
    model_file = tmp_path / "step-000004" / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:40])  # e.g. a disk that filled up
    with pytest.raises(CheckpointError, match="model.pt should hold"):
        load_checkpoint(tmp_path / "step-000004")

    run = SimpleNamespace(checkpoint_root=tmp_path, wall_seconds_before=0.0, summary={})
    state = restore_training_state(run, {"model": model}, None, None)
    assert state["step"] == 2 and torch.all(model.weight == 2.0)
    assert "step-000004" in capsys.readouterr().err
