"""The non-finite guard: a NaN/Inf loss or gradient skips the update, is counted in the metrics, and
``max_nonfinite_steps`` of them in a row stop the run with a message naming the step and the causes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from zerorl import cli
from zerorl.config import TrainConfig, build_config
from zerorl.lm import grpo
from zerorl.lm.models import build_tiny_model
from zerorl.lm.runtime import NonFiniteLossError

REWARD_FILE = '''
def digits(prompts, completions, **kwargs):
    return [sum(ch.isdigit() for ch in text) / max(1, len(text)) for text in completions]
'''


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite")
    build_tiny_model(root / "tiny", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, seed=5)
    (root / "reward.py").write_text(REWARD_FILE)
    return root


def _config(assets, out, **overrides) -> TrainConfig:
    values = {"model": str(assets / "tiny"), "output_dir": str(out), "template": "compact",
              "reward_funcs": [f"{assets / 'reward.py'}:digits"], "prompts_per_step": 2, "num_generations": 4,
              "max_completion_length": 8, "learning_rate": 1e-2, "warmup_steps": 0, "save_steps": 0,
              "eval_at_start": False, "eval_at_end": False, "num_eval": 2, "plots": False, "progress": False}
    values.update(overrides)
    return build_config(TrainConfig, None, values)


def _inject(monkeypatch, bad_steps: set[int], kind: str) -> None:
    """Make the loss (or, through a hook, the gradient) non-finite on the given 1-based steps.
    With one minibatch and one micro-batch, grpo_loss is called exactly once per step."""
    real_loss = grpo.grpo_loss
    calls = []

    def loss_with_faults(model, micro, config, on_policy, native=None):
        calls.append(1)
        loss, metrics = real_loss(model, micro, config, on_policy, native=native)
        if len(calls) in bad_steps:
            if kind == "loss":
                loss = loss * float("nan")
            else:  # the loss value stays finite; its gradient overflows on the way back
                loss.register_hook(lambda grad: grad * float("inf"))
        return loss, metrics

    monkeypatch.setattr(grpo, "grpo_loss", loss_with_faults)


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_nonfinite_steps_are_skipped_and_counted(assets, tmp_path, monkeypatch, kind):
    _inject(monkeypatch, {1, 2}, kind)
    grpo.train(_config(assets, tmp_path / "skipped", max_steps=2))
    rows = _rows(tmp_path / "skipped")
    assert [r["nonfinite_skipped"] for r in rows] == [1, 1]
    assert all(r["grad_norm"] == "nan" for r in rows)  # no update happened, so no norm was recorded
    # Both updates were skipped: the weights are the initial ones, bit for bit (Adam never stepped).
    start = load_file(assets / "tiny" / "model.safetensors")
    final = load_file(tmp_path / "skipped" / "final" / "model.safetensors")
    assert all(torch.equal(start[name], final[name]) for name in start)

    # Control: the same run with one bad step out of three does move the weights, and counts only it.
    grpo.train(_config(assets, tmp_path / "one_bad", max_steps=3))
    rows = _rows(tmp_path / "one_bad")
    assert [r["nonfinite_skipped"] for r in rows] == [0, 0, 0]  # the call counter is past {1, 2} now
    final = load_file(tmp_path / "one_bad" / "final" / "model.safetensors")
    assert not all(torch.equal(start[name], final[name]) for name in start)


def test_k_in_a_row_abort_naming_the_step_and_causes(assets, tmp_path, monkeypatch):
    _inject(monkeypatch, {2, 3, 4}, "loss")
    with pytest.raises(NonFiniteLossError) as error:
        grpo.train(_config(assets, tmp_path, max_steps=8, max_nonfinite_steps=3))
    message = str(error.value)
    assert message.startswith("step 4:")  # steps 2, 3, 4 were bad: the third in a row stops the run
    for words in ("3 steps in a row", "max_nonfinite_steps", "learning_rate", "dtype=float32"):
        assert words in message
    assert [r["nonfinite_skipped"] for r in _rows(tmp_path)] == [0, 1, 1, 1]  # logged before stopping


def test_a_good_step_resets_the_count(assets, tmp_path, monkeypatch):
    _inject(monkeypatch, {1, 2, 4, 5}, "loss")
    grpo.train(_config(assets, tmp_path, max_steps=6, max_nonfinite_steps=3))
    assert [r["nonfinite_skipped"] for r in _rows(tmp_path)] == [1, 1, 0, 1, 1, 0]


def test_cli_reports_the_abort_without_a_traceback(assets, tmp_path, monkeypatch, capsys):
    _inject(monkeypatch, {1, 2}, "loss")
    argv = ["train", "--model", str(assets / "tiny"), "--output-dir", str(tmp_path), "--max-steps", "5",
            "template=compact", f"reward_funcs=[{assets / 'reward.py'}:digits]", "prompts_per_step=2",
            "num_generations=2", "max_completion_length=8", "max_nonfinite_steps=2", "eval_at_start=false",
            "eval_at_end=false", "num_eval=2", "plots=false", "progress=false"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "zerorl train: stopped: step 2:" in err and "Traceback" not in err


def test_max_nonfinite_steps_is_validated():
    with pytest.raises(ValueError, match=r"max_nonfinite_steps=0 .*must be ≥ 1"):
        build_config(TrainConfig, None, {"max_nonfinite_steps": "0"})
