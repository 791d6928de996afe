"""User reward functions inside a training run: worker processes with a timeout (``reward_timeout_s``),
and the ``reward_errors`` policy (raise: stop with the function's name and a sample; zero: score 0.0,
count it in ``rewards/<name>/errors`` and go on)."""

from __future__ import annotations

import json
import os

import pytest

from zerorl.config import TrainConfig, build_config
from zerorl.lm.grpo import train
from zerorl.lm.models import build_tiny_model
from zerorl.rewards import RewardFunctionError

REWARD_FILE = '''
import os
import time


def digits(prompts, completions, **kwargs):
    with open(os.environ["ZERORL_TEST_PID_FILE"], "a") as handle:
        handle.write(f"{os.getpid()}\\n")
    return [sum(ch.isdigit() for ch in text) / max(1, len(text)) for text in completions]


def broken(prompts, completions, **kwargs):
    raise ZeroDivisionError("the user's verifier divided by zero")


def hangs(prompts, completions, **kwargs):
    time.sleep(60)
    return [0.0] * len(completions)
'''
STEPS, PROMPTS, G = 2, 2, 2


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("isolation")
    build_tiny_model(root / "tiny", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, seed=7)
    (root / "rewards.py").write_text(REWARD_FILE)
    return root


@pytest.fixture
def pid_file(tmp_path, monkeypatch):
    path = tmp_path / "pids.txt"
    monkeypatch.setenv("ZERORL_TEST_PID_FILE", str(path))  # inherited by the reward workers
    return path


def _config(assets, out, functions, **overrides) -> TrainConfig:
    values = {"model": str(assets / "tiny"), "output_dir": str(out), "template": "compact",
              "reward_funcs": [f"{assets / 'rewards.py'}:{name}" for name in functions] + ["format"],
              "max_steps": STEPS, "prompts_per_step": PROMPTS, "num_generations": G, "max_completion_length": 8,
              "save_steps": 0, "eval_at_start": False, "eval_at_end": False, "num_eval": 2, "plots": False,
              "progress": False}
    values.update(overrides)
    return build_config(TrainConfig, None, values)


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_user_function_runs_in_a_worker_process(assets, tmp_path, pid_file):
    train(_config(assets, tmp_path, ["digits"], reward_timeout_s=20))
    pids = {int(line) for line in pid_file.read_text().split()}
    assert len(pids) == 1 and os.getpid() not in pids  # one persistent worker, not this process
    rows = _rows(tmp_path)
    assert len(rows) == STEPS and all(0.0 <= r["rewards/digits/mean"] <= 1.0 for r in rows)
    assert all(r["rewards/digits/errors"] == 0 for r in rows)
    (pid,) = pids
    with pytest.raises(ProcessLookupError):  # finish_run closed the worker
        os.kill(pid, 0)


def test_without_a_timeout_the_function_runs_in_process(assets, tmp_path, pid_file):
    train(_config(assets, tmp_path, ["digits"]))
    assert {int(line) for line in pid_file.read_text().split()} == {os.getpid()}


@pytest.mark.parametrize("timeout", [None, 20.0])
def test_raise_policy_names_the_function_and_a_sample(assets, tmp_path, timeout):
    with pytest.raises(RewardFunctionError) as error:
        train(_config(assets, tmp_path, ["broken"], reward_timeout_s=timeout, reward_errors="raise"))
    message = str(error.value)
    assert "reward function 'broken'" in message
    assert "ZeroDivisionError" in message and "divided by zero" in message
    assert "offending completion" in message
    assert _rows(tmp_path) == []  # it stopped in the first step, before any update was logged


def test_zero_policy_scores_zero_counts_and_goes_on(assets, tmp_path):
    with pytest.warns(RuntimeWarning, match="'broken'"):
        train(_config(assets, tmp_path, ["broken"], reward_timeout_s=20, reward_errors="zero"))
    rows = _rows(tmp_path)
    assert len(rows) == STEPS
    for row in rows:
        assert row["rewards/broken/mean"] == 0.0
        assert row["rewards/broken/errors"] == PROMPTS * G  # the whole batch was zeroed, every step
        assert row["reward"] == row["rewards/format/mean"]  # only the other function counted
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_a_hanging_function_times_out(assets, tmp_path):
    with pytest.raises(RewardFunctionError) as error:
        train(_config(assets, tmp_path / "raise", ["hangs"], reward_timeout_s=1, reward_errors="raise"))
    assert "'hangs' did not return within 1 s" in str(error.value)

    with pytest.warns(RuntimeWarning, match="'hangs'"):
        train(_config(assets, tmp_path / "zero", ["hangs"], reward_timeout_s=1, reward_errors="zero",
                      max_steps=1))
    assert _rows(tmp_path / "zero")[0]["rewards/hangs/errors"] == PROMPTS * G


def test_reward_timeout_is_validated():
    with pytest.raises(ValueError, match=r"reward_timeout_s=0.0 .*> 0 seconds"):
        build_config(TrainConfig, None, {"reward_timeout_s": "0"})
