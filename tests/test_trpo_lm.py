"""TRPO for LMs: every accepted step stays within δ (measured independently), the line search rejects and
restores a step that would leave the trust region, group advantages and the KL penalty in the surrogate by
hand, the trainer's logs with and without a critic, LoRA."""

import json

import pytest
import torch

from zerorl.config import TrainConfig, build_config
from zerorl.core.advantages import gae
from zerorl.core.trust_region import backtracking_line_search, flat_grad
from zerorl.lm.models import load_model_and_tokenizer
from zerorl.lm.trpo import (
    TrustRegionProblem,
    group_advantages,
    rollout_statistics,
    train,
    trust_region_update,
    vocab_kl_sum,
)
from zerorl.lm.value_model import build_critic, masked_whiten, token_level_rewards

TASK_ARGS = {"max_digits": 1, "operators": "+", "num_eval": 12}


def _config(model, out, **overrides) -> TrainConfig:
    values = {"algo": "trpo", "model": str(model), "task": "arithmetic", "task_args": TASK_ARGS,
              "template": "compact", "output_dir": str(out), "num_eval": 12, "eval_samples_per_prompt": 2,
              "prompts_per_step": 8, "num_generations": 4, "max_completion_length": 12, "progress": False,
              "plots": False, "save_steps": 0, "learning_rate": 1e-2, "warmup_steps": 0, "eval_at_start": False,
              "eval_at_end": False, "num_threads": 1, "fisher_subsample": 2, "micro_batch_size": 16}
    values.update(overrides)
    return build_config(TrainConfig, None, values)


def _rollout(run, config, seed):
    """One scored batch with π_old, V, GAE advantages, and log π_old over the vocabulary."""
    from zerorl.lm.pipeline import render_prompts, rollout_and_score
    from zerorl.lm.rollout import SamplingParams

    rows = [run.task.train_row(seed * 8 + i) for i in range(8)]
    batch, _ = rollout_and_score(run.engine, render_prompts(rows, run.template, run.tokenizer),
                                 SamplingParams(n=4, max_new_tokens=12), run.reward_set, seed=seed)
    old_vocab = rollout_statistics(run.model, build_critic(run.model, "separate"), batch,
                                   config.micro_batch_size, config.temperature)
    mask = batch.completion_mask.bool()
    rewards = token_level_rewards(batch.rewards, batch.old_logprobs, None, mask, 0.0)
    advantages, batch.returns = gae(rewards, batch.values, mask, gamma=1.0, lam=1.0)
    batch.advantages = masked_whiten(advantages, mask)
    return batch, old_vocab


def _plain_mean_kl(model, batch, old_vocab, micro_batch_size) -> float:
    """mean_t Σ_v π_old(v) log(π_old(v) / π_θ(v)) written out with a full forward pass and loops."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start, old in zip(range(0, len(batch), micro_batch_size), old_vocab):
            micro = batch.select(torch.arange(start, min(start + micro_batch_size, len(batch))))
            ids = torch.cat([micro.prompt_ids, micro.completion_ids], 1)
            mask = torch.cat([micro.prompt_mask, micro.completion_mask], 1)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
            new = torch.log_softmax(logits[:, micro.prompt_ids.shape[1] - 1:-1], dim=-1)
            for i in range(len(micro)):
                for t in range(int(micro.completion_mask[i].sum())):
                    p_old = old[i, t].exp()
                    total += float((p_old * (old[i, t] - new[i, t])).sum())
                    count += 1
    return total / count


def test_vocab_kl_is_the_exact_categorical_kl():
    torch.manual_seed(0)
    old = torch.log_softmax(torch.randn(2, 3, 7), -1)
    new = torch.log_softmax(torch.randn(2, 3, 7), -1)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    expected = sum(torch.nn.functional.kl_div(new[i, t], old[i, t], log_target=True, reduction="sum")
                   for i, t in ((0, 0), (0, 1), (1, 0)))
    torch.testing.assert_close(vocab_kl_sum(old, new, mask), expected)
    assert vocab_kl_sum(old, old, mask) == 0


@pytest.mark.parametrize("max_kl", [0.01, 0.002])
def test_every_accepted_step_stays_within_delta(random_tiny_model, digits_reward, tmp_path, max_kl):
    from zerorl.lm.runtime import setup_lm_run

    config = _config(random_tiny_model, tmp_path, reward_funcs=[digits_reward], max_kl=max_kl)
    run = setup_lm_run(config)
    params = [p for p in run.model.parameters() if p.requires_grad]
    accepted = 0
    for iteration in range(3):
        batch, old_vocab = _rollout(run, config, seed=iteration)
        info = trust_region_update(run.model, params, batch, old_vocab, config)
        measured = _plain_mean_kl(run.model, batch, old_vocab, config.micro_batch_size)
        assert measured == pytest.approx(info.kl, rel=1e-3, abs=1e-7)  # the logged KL is the real one
        if info.accepted:
            accepted += 1
            assert measured <= max_kl, (iteration, measured, max_kl)
            assert info.surrogate_after > info.surrogate_before
            assert 0 <= info.backtracks < config.max_backtracks
    assert accepted >= 2


def test_line_search_rejects_a_step_beyond_delta_and_restores_bit_exactly(random_tiny_model, digits_reward, tmp_path):
    from zerorl.lm.runtime import setup_lm_run

    config = _config(random_tiny_model, tmp_path, reward_funcs=[digits_reward])
    run = setup_lm_run(config)
    batch, old_vocab = _rollout(run, config, seed=0)
    params = [p for p in run.model.parameters() if p.requires_grad]
    problem = TrustRegionProblem(run.model, params, batch.micro_batches(config.micro_batch_size), old_vocab,
                                 config.temperature)
    gradient = flat_grad(problem.surrogate(), params)
    full_step = 50.0 * gradient / gradient.norm()  # far outside δ = 0.01, even after 2 halvings
    before = [p.detach().clone() for p in params]

    # The smallest fraction the search will try (¼) would exceed δ: check it, then restore by hand.
    with torch.no_grad():
        for p, g in zip(params, torch.split(0.25 * full_step, [p.numel() for p in params])):
            p.add_(g.view_as(p))
        assert float(problem.kl()) > config.max_kl
        for p, b in zip(params, before):
            p.copy_(b)

    result = backtracking_line_search(params, problem.surrogate, problem.kl, full_step, max_kl=config.max_kl,
                                      expected_improvement=float(gradient @ full_step), max_backtracks=3)
    assert not result.accepted and result.step_fraction == 0.0
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # bit for bit
    assert result.kl == 0.0  # measured at the restored parameters: π_θ = π_old


def test_group_advantages_by_hand():
    from types import SimpleNamespace

    # Two prompts × G = 4. Group 1: rewards 1, 0, 0, 1 → mean ½, unbiased std √(1/3) → ±√3/2;
    # group 2: all equal → 0. Each completion's advantage sits on each of its valid tokens.
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1], [0, 0, 0]])
    batch = SimpleNamespace(rewards=torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5]), completion_mask=mask)
    a = 3 ** 0.5 / 2
    config = build_config(TrainConfig, None, {"num_generations": 4, "trpo_advantages": "group"})
    expected = torch.tensor([[a, a, 0], [-a, 0, 0], [-a, -a, -a], [a, a, 0]] + [[0.0, 0, 0]] * 4)
    torch.testing.assert_close(group_advantages(batch, config), expected, atol=1e-5, rtol=1e-5)
    # Dr. GRPO's scale (no std): ±½.
    config = build_config(TrainConfig, None, {"num_generations": 4, "scale_rewards": "none"})
    torch.testing.assert_close(group_advantages(batch, config)[:4, 0], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_surrogate_pays_the_kl_to_the_reference(random_tiny_model, digits_reward, tmp_path):
    """At θ = θ_old the ratio is 1: L = token-mean(Â) − β · token-mean(k3(π_θ‖π_ref)), with k3 by hand."""
    from zerorl.lm.runtime import setup_lm_run

    config = _config(random_tiny_model, tmp_path, reward_funcs=[digits_reward])
    run = setup_lm_run(config)
    batch, old_vocab = _rollout(run, config, seed=0)
    mask = batch.completion_mask.bool()
    batch.ref_logprobs = torch.where(mask, batch.old_logprobs - 0.3, torch.zeros_like(batch.old_logprobs))
    params = [p for p in run.model.parameters() if p.requires_grad]
    problem = TrustRegionProblem(run.model, params, batch.micro_batches(config.micro_batch_size), old_vocab,
                                 config.temperature, kl_coef=0.5, kl_estimator="k3")
    k3 = torch.exp(torch.tensor(-0.3)) - 1 + 0.3  # e^{ref − logp} − (ref − logp) − 1, the same on every token
    expected = float(batch.advantages[mask].mean()) - 0.5 * float(k3)
    with torch.no_grad():
        assert float(problem.surrogate()) == pytest.approx(expected, abs=1e-5)
        problem.kl_coef = 0.0
        assert float(problem.surrogate()) == pytest.approx(float(batch.advantages[mask].mean()), abs=1e-5)


@pytest.mark.parametrize("advantages", ["gae", "group"])
def test_trpo_trainer_logs_the_trust_region(random_tiny_model, digits_reward, tmp_path, advantages):
    steps = 3
    config = _config(random_tiny_model, tmp_path, max_steps=steps, reward_funcs=["accuracy", digits_reward],
                     eval_at_end=True, max_kl=0.005, trpo_advantages=advantages)
    summary = train(config)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == steps and summary["algo"] == "trpo"
    for row in rows:
        for key in ("trust_region/kl", "trust_region/backtracks", "trust_region/surrogate_improvement",
                    "trust_region/accepted", "kl", "entropy", "step_time"):
            assert key in row, key
        assert ("value_loss" in row) == (advantages == "gae")
        if row["trust_region/accepted"]:
            assert row["trust_region/kl"] <= config.max_kl and row["trust_region/surrogate_improvement"] > 0
    assert sum(r["trust_region/accepted"] for r in rows) >= 2
    assert summary["eval_after"]["n"] == 12
    if advantages == "gae":
        assert set(summary["models"]) == {"policy", "critic", "reference"}
        assert summary["models"]["critic"]["trainable"] > 0
    else:  # no critic: the policy and π_ref, as GRPO, and no optimizer state
        assert set(summary["models"]) == {"policy", "reference"}
        n = summary["models"]["policy"]["trainable"]
        assert summary["models"]["reference"] == {"trainable": 0, "frozen": n}
        assert summary["model_state_bytes"] == 4 * (2 * n + n)  # fp32 params + grads, frozen copy


@pytest.mark.parametrize("advantages", ["gae", "group"])
def test_trpo_over_lora_parameters_only(random_tiny_model, digits_reward, tmp_path, advantages):
    config = _config(random_tiny_model, tmp_path, max_steps=2, lora_rank=2, critic="value_head",
                     trpo_advantages=advantages, reward_funcs=[digits_reward])
    summary = train(config)
    assert ("critic" in summary["models"]) == (advantages == "gae")
    assert "reference" not in summary["models"]  # π_ref is the policy with its adapters switched off
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r["trust_region/accepted"] for r in rows)
    assert all(r["trust_region/kl"] <= config.max_kl for r in rows if r["trust_region/accepted"])
    # rank 2 · (in + out) over q, k, v, o, gate, up, down of the one layer; nothing else is trained
    assert summary["models"]["policy"]["trainable"] == 2 * (64 + 48 + 48 + 64 + 192 * 2 + 192)
    before, _ = load_model_and_tokenizer(str(random_tiny_model))
    after, _ = load_model_and_tokenizer(str(tmp_path / "final"))
    b, a = dict(before.named_parameters()), dict(after.named_parameters())
    assert torch.equal(b["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(b["model.norm.weight"], a["model.norm.weight"])
    assert not torch.equal(b["model.layers.0.mlp.up_proj.weight"], a["model.layers.0.mlp.up_proj.weight"])


def test_the_trust_region_step_split_across_cpu_workers_equals_the_serial_step(random_tiny_model, digits_reward,
                                                                                tmp_path):
    """Gradient, Fisher-vector products and line-search forwards on two workers (each through its own copy
    of the policy) give the serial numbers up to float summation order, and the same step."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from zerorl.core.trust_region import fisher_vector_product, trpo_step
    from zerorl.lm.parallel import CPUWorkers, Replicas
    from zerorl.lm.runtime import setup_lm_run

    config = _config(random_tiny_model, tmp_path, reward_funcs=[digits_reward], micro_batch_size=8)
    run = setup_lm_run(config)
    batch, old_vocab = _rollout(run, config, seed=3)
    params = [p for p in run.model.parameters() if p.requires_grad]
    micros = batch.micro_batches(config.micro_batch_size)
    assert len(micros) == 4
    workers, replicas = CPUWorkers(2), Replicas(run.model, 2)
    old_logprobs = batch.old_logprobs.clone()
    again = rollout_statistics(run.model, None, batch, config.micro_batch_size, config.temperature, workers=workers)
    assert torch.equal(batch.old_logprobs, old_logprobs)  # π_old on the workers: each micro-batch alone, same numbers
    assert all(torch.equal(a, b) for a, b in zip(again, old_vocab))
    serial = TrustRegionProblem(run.model, params, micros, old_vocab, config.temperature, fisher_subsample=2)
    split = TrustRegionProblem(run.model, params, micros, old_vocab, config.temperature, fisher_subsample=2,
                               workers=workers, replicas=replicas)
    assert split.parallel and not serial.parallel
    vector = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(0))
    with sdpa_kernel([SDPBackend.MATH]):
        surrogate = serial.surrogate()
        gradient = flat_grad(surrogate, params)
        split_surrogate, split_gradient = split.surrogate_gradient()
        assert torch.allclose(split_surrogate, surrogate.detach(), atol=1e-7)
        assert torch.allclose(split_gradient, gradient, rtol=1e-5, atol=1e-7) and gradient.norm() > 0
        expected = fisher_vector_product(serial.kl, params, damping=0.1)(vector)
        assert torch.allclose(split.fisher(0.1)(vector), expected, rtol=1e-5, atol=1e-7)
        with torch.no_grad():
            assert torch.equal(split.kl(), serial.kl())  # the line search's passes: each micro-batch alone

        start = [p.detach().clone() for p in params]
        serial_info = trpo_step(params, serial.surrogate, serial.kl, max_kl=config.max_kl)
        after_serial = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
        split_info = trpo_step(params, split.surrogate, split.kl, max_kl=config.max_kl,
                               gradient_fn=split.surrogate_gradient, fisher_fn=split.fisher)
    workers.shutdown()
    assert serial_info.accepted and split_info.accepted and split_info.backtracks == serial_info.backtracks
    for p, expected_param in zip(params, after_serial):
        assert torch.allclose(p, expected_param, rtol=1e-4, atol=1e-6)
