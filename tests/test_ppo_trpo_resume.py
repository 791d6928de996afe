"""PPO, TRPO (and GRPO on two CPU workers) resume exactly: a run interrupted after its step-2 checkpoint (mid-way through step 4) and
continued with resume=True ends with the same weights — policy and critic, bit for bit — and the same
metrics as a run that was never interrupted. In-process and tiny (a random one-layer Qwen2, 4 steps)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from zerorl.checkpoint import latest_checkpoint, load_checkpoint
from zerorl.config import TrainConfig, build_config
from zerorl.lm import grpo, ppo, trpo

MAX_STEPS = 4
TIMING_KEYS = ("time/", "step_time", "tokens_per_second")


@pytest.fixture(autouse=True)
def restore_thread_count():
    """The runs set torch's (process-wide) thread count; leave it as found for the next test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


class Interrupted(Exception):
    """Stands in for a kill: raised inside a step, after the last checkpoint."""


def _config(algo, model, reward, out, **overrides) -> TrainConfig:
    values = {"algo": algo, "model": str(model), "task": "arithmetic",
              "task_args": {"max_digits": 1, "operators": "+", "num_eval": 12}, "template": "compact",
              "reward_funcs": [reward], "output_dir": str(out), "max_steps": MAX_STEPS, "save_steps": 2,
              "prompts_per_step": 4, "num_generations": 4, "max_completion_length": 10, "learning_rate": 1e-2,
              "warmup_steps": 1, "lr_scheduler_type": "cosine", "num_iterations": 2, "num_minibatches": 2,
              "micro_batch_size": 8, "fisher_subsample": 2, "max_kl": 0.01, "beta": 0.04,
              "eval_at_start": False, "eval_at_end": False, "num_eval": 12, "plots": False,
              "progress": False, "num_threads": 1}
    values.update(overrides)
    return build_config(TrainConfig, None, values)


def _final_state(out) -> tuple[dict, dict]:
    tensors, _ = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    return load_file(out / "final" / "model.safetensors"), tensors


def _metrics(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(TIMING_KEYS)} for row in rows]


@pytest.mark.parametrize("algo, overrides", [
    ("ppo", {}),
    ("trpo", {"trpo_advantages": "gae", "critic_learning_rate": 1e-3}),
    ("trpo", {"trpo_advantages": "group"}),
    # Two CPU workers: micro-batches in parallel, gradients summed in micro-batch order (PPO, GRPO) or per
    # worker in worker order (TRPO's trust-region step).
    ("ppo", {"num_threads": 2, "cpu_workers": 2, "micro_batch_size": 4}),
    ("grpo", {"num_threads": 2, "cpu_workers": 2, "micro_batch_size": 4}),
    ("trpo", {"trpo_advantages": "group", "num_threads": 2, "cpu_workers": 2, "micro_batch_size": 4}),
], ids=["ppo", "trpo-gae", "trpo-group", "ppo-2-workers", "grpo-2-workers", "trpo-2-workers"])
def test_interrupted_then_resumed_equals_uninterrupted(algo, overrides, random_tiny_model, digits_reward,
                                                       tmp_path, monkeypatch):
    module = {"ppo": ppo, "trpo": trpo, "grpo": grpo}[algo]
    reference = tmp_path / "reference"
    module.train(_config(algo, random_tiny_model, digits_reward, reference, **overrides))

    # Interrupt inside step 4 (its rollout): steps 1-3 ran, the step-2 checkpoint is the newest.
    out = tmp_path / "resumed"
    original, calls = module.rollout_and_score, []

    def rollout_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise Interrupted
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "rollout_and_score", rollout_then_die)
    with pytest.raises(Interrupted):
        module.train(_config(algo, random_tiny_model, digits_reward, out, **overrides))
    assert len(_metrics(out)) == 3 and latest_checkpoint(out / "checkpoints").name.endswith("2")
    resumed_steps = []

    def counting_rollout(*args, **kwargs):
        resumed_steps.append(kwargs["seed"])
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "rollout_and_score", counting_rollout)
    module.train(_config(algo, random_tiny_model, digits_reward, out, **overrides), resume=True)
    assert len(resumed_steps) == 2  # steps 3 and 4 only: it continued from the checkpoint, not from scratch

    (got_final, got_state), (want_final, want_state) = _final_state(out), _final_state(reference)
    start = load_file(random_tiny_model / "model.safetensors")
    assert sum(not torch.equal(start[k], want_final[k]) for k in start) >= len(start) - 1  # training moved them
    assert got_final.keys() == want_final.keys()
    for name in want_final:
        assert torch.equal(got_final[name], want_final[name]), name
    assert ("critic" in want_state) == (algo == "ppo" or overrides.get("trpo_advantages") == "gae")
    for part in ("critic", "optimizer"):
        if want_state.get(part):
            flat_got, flat_want = _flatten(got_state[part]), _flatten(want_state[part])
            assert flat_got.keys() == flat_want.keys()
            for key in flat_want:
                assert torch.equal(flat_got[key], flat_want[key]), (part, key)
    assert _metrics(out) == _metrics(reference)  # steps 3-4 replayed with the same samples and updates


def _flatten(tree, prefix="") -> dict[str, torch.Tensor]:
    """Tensors of a nested state dict, by path (non-tensor leaves as 0-d tensors)."""
    out = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list | tuple) else None
    if items is None:
        return {prefix: tree if isinstance(tree, torch.Tensor) else torch.tensor(float(tree))
                if isinstance(tree, int | float) else torch.tensor(0.0)}
    for key, value in items:
        out.update(_flatten(value, f"{prefix}/{key}"))
    return out
