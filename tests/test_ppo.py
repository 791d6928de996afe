"""PPO for LMs: token rewards and GAE by hand, learning on a tiny model, both critics, a reward model, LoRA."""

import json
from types import SimpleNamespace

import pytest
import torch

from zerorl.config import ConfigError, TrainConfig, build_config
from zerorl.core.advantages import gae
from zerorl.lm.forward import completion_logits
from zerorl.lm.models import load_model_and_tokenizer
from zerorl.lm.ppo import estimate_advantages, ppo_loss, train
from zerorl.lm.value_model import (
    RewardModelScorer,
    ValueHead,
    build_critic,
    logits_and_values,
    masked_whiten,
    token_level_rewards,
)

# 1-digit addition has 55 distinct problems; the task holds out at most a quarter of them.
TASK_ARGS = {"max_digits": 1, "operators": "+", "num_eval": 12}


def _config(model, out, **overrides) -> TrainConfig:
    values = {"algo": "ppo", "model": str(model), "task": "arithmetic", "task_args": TASK_ARGS,
              "template": "compact", "output_dir": str(out), "num_eval": 12, "eval_samples_per_prompt": 2,
              "prompts_per_step": 8, "num_generations": 4, "max_completion_length": 12, "progress": False,
              "plots": False, "save_steps": 0, "learning_rate": 1e-2, "warmup_steps": 0, "eval_at_start": False,
              "eval_at_end": False, "num_threads": 1}
    values.update(overrides)
    return build_config(TrainConfig, None, values)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_token_rewards_and_gae_by_hand():
    # Two completions of 3 and 2 tokens; β = 0.1; the scalar score sits on the last valid token.
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.2, 0.0]])
    ref_logprobs = torch.tensor([[-1.2, -1.5, -0.5], [-1.0, -0.2, 0.0]])
    rewards = token_level_rewards(torch.tensor([1.0, -0.5]), logprobs, ref_logprobs, mask, kl_coef=0.1)
    # −β·(logp − ref) = [−0.02, 0.05, 0] and [0.05, 0]; + 1.0 at t=2 of row 0, −0.5 at t=1 of row 1.
    torch.testing.assert_close(rewards, torch.tensor([[-0.02, 0.05, 1.0], [0.05, -0.5, 0.0]]))

    values = torch.tensor([[0.5, 0.6, 0.7], [0.1, -0.2, 9.9]])  # 9.9 is padding garbage
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0: δ2 = 1 − 0.7 = 0.3; δ1 = 0.05 + 0.7 − 0.6 = 0.15 → Â1 = 0.15 + 0.5·0.3 = 0.3;
    #        δ0 = −0.02 + 0.6 − 0.5 = 0.08 → Â0 = 0.08 + 0.5·0.3 = 0.23
    # row 1: δ1 = −0.5 − (−0.2) = −0.3; δ0 = 0.05 − 0.2 − 0.1 = −0.25 → Â0 = −0.25 + 0.5·(−0.3) = −0.4
    torch.testing.assert_close(advantages, torch.tensor([[0.23, 0.3, 0.3], [-0.4, -0.3, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.73, 0.9, 1.0], [-0.3, -0.5, 0.0]]))

    # No reference (β = 0): only the scores; an empty row gets nothing.
    empty = token_level_rewards(torch.tensor([2.0, 3.0]), logprobs, None, torch.tensor([[1, 1, 0], [0, 0, 0]]), 0.1)
    torch.testing.assert_close(empty, torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0]]))


def test_masked_whiten_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [5.0, 100.0, -7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    # valid: 1, 2, 3, 5 → mean 2.75, unbiased var = (3.0625 + 0.5625 + 0.0625 + 5.0625) / 3 = 2.9167
    std = (8.75 / 3) ** 0.5
    expected = torch.tensor([[(1 - 2.75) / std, (2 - 2.75) / std, (3 - 2.75) / std], [(5 - 2.75) / std, 0, 0]])
    torch.testing.assert_close(masked_whiten(values, mask), expected, atol=1e-6, rtol=1e-6)


def test_value_head_forward_matches_the_policy_logits(random_tiny_model):
    model, tok = load_model_and_tokenizer(str(random_tiny_model))
    prompt = tok(["3+4=?\n", "12+5=?\n"], padding=True, return_tensors="pt")
    completion_ids = torch.randint(2, 40, (2, 5), generator=torch.Generator().manual_seed(0))
    completion_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])

    micro = SimpleNamespace(prompt_ids=prompt["input_ids"], prompt_mask=prompt["attention_mask"],
                            completion_ids=completion_ids, completion_mask=completion_mask)
    expected = completion_logits(model, micro.prompt_ids, micro.prompt_mask, completion_ids, completion_mask)
    for kind in ("value_head", "separate"):
        critic = build_critic(model, kind)
        logits, values = logits_and_values(model, critic, micro)
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        assert values.shape == (2, 5) and torch.all(values == 0)  # zero-initialized head: V = 0


def test_ppo_raises_the_reward(random_tiny_model, digits_reward, tmp_path):
    steps = 16
    summary = train(_config(random_tiny_model, tmp_path, max_steps=steps, reward_funcs=[digits_reward]))
    rows = _metrics(tmp_path)
    assert len(rows) == steps and summary["algo"] == "ppo"
    first = sum(r["reward"] for r in rows[:4]) / 4  # ≈ 10 digits / 99 characters ≈ 0.1
    last = sum(r["reward"] for r in rows[-4:]) / 4
    assert last > first + 0.15, (first, last)
    for key in ("kl", "clip_ratio", "vf_clipfrac", "vf_explained_var", "entropy", "policy_loss", "value_loss",
                "critic_grad_norm", "step_time"):
        assert key in rows[0], key


def _scored_batch(model_dir, digits_reward, tmp_path, critic_kind):
    from zerorl.lm.pipeline import render_prompts, rollout_and_score
    from zerorl.lm.rollout import SamplingParams
    from zerorl.lm.runtime import setup_lm_run

    config = _config(model_dir, tmp_path, reward_funcs=[digits_reward], critic=critic_kind, beta=0.0)
    run = setup_lm_run(config)
    rows = [run.task.train_row(i) for i in range(8)]
    batch, _ = rollout_and_score(run.engine, render_prompts(rows, run.template, run.tokenizer),
                                 SamplingParams(n=4, max_new_tokens=12), run.reward_set, seed=0)
    critic = build_critic(run.model, critic_kind)
    estimate_advantages(run.model, critic, None, batch, config)
    return run.model, critic, batch, config


@pytest.mark.parametrize("critic_kind", ["separate", "value_head"])
def test_critic_fits_returns_and_policy_step_raises_the_surrogate(random_tiny_model, digits_reward, tmp_path, critic_kind):
    policy, critic, batch, config = _scored_batch(random_tiny_model, digits_reward, tmp_path, critic_kind)
    mask = batch.completion_mask.bool()

    def surrogate() -> float:  # mean_t Â_t · log π(o_t): what the PPO gradient ascends at ratio 1
        from zerorl.core.logprobs import logprobs_from_logits

        with torch.no_grad():
            logits, _ = logits_and_values(policy, critic, batch)
            logp = logprobs_from_logits(logits, batch.completion_ids)
        return float((batch.advantages * logp)[mask].mean())

    before = surrogate()
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    optimizer.zero_grad()
    loss, _ = ppo_loss(policy, critic, batch, config)
    loss.backward()
    optimizer.step()
    assert surrogate() > before + 1e-3  # the update moves probability toward positive-advantage tokens

    # The critic alone, 30 Adam steps on the same batch: the value loss must fall by more than half.
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        critic_optimizer.zero_grad()
        _, values = logits_and_values(policy, critic, batch)
        value_loss = 0.5 * (values - batch.returns)[mask].square().mean()
        value_loss.backward()
        critic_optimizer.step()
        losses.append(value_loss.item())
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def test_separate_critic_and_kl_in_loss(random_tiny_model, digits_reward, tmp_path):
    # accuracy stays in the reward set because the held-out evaluation reads it.
    summary = train(_config(random_tiny_model, tmp_path, max_steps=2, critic="separate", kl_in_reward=False,
                            reward_funcs=["accuracy", digits_reward],
                            num_iterations=2, num_minibatches=2, eval_at_end=True))
    rows = _metrics(tmp_path)
    # With μ = 2 and 2 minibatches the policy moves between minibatches: the ratio leaves 1.
    assert any(abs(r["ratio_max"] - 1.0) > 1e-4 for r in rows)
    models = summary["models"]
    policy = models["policy"]["trainable"]
    # separate critic = a second transformer (everything but the LM head) + a scalar head of H + 1.
    model, _ = load_model_and_tokenizer(str(random_tiny_model))
    backbone = sum(p.numel() for p in model.base_model.parameters())
    assert models["critic"]["trainable"] == backbone + 32 + 1
    assert models["reference"] == {"trainable": 0, "frozen": policy}
    assert summary["eval_after"]["n"] == 12 and (tmp_path / "final" / "model.safetensors").exists()


def test_reward_model_scores_and_trains(random_tiny_model, tmp_path):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

    tok = AutoTokenizer.from_pretrained(str(random_tiny_model))
    torch.manual_seed(0)
    rm = Qwen2ForSequenceClassification(Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id, max_position_embeddings=256))
    rm_dir = tmp_path / "rm"
    rm.save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)

    scorer = RewardModelScorer(rm_dir)
    prompts, completions = ["1+2=?\n", "3+4=?\n"], ["<answer>3</answer>", "7"]
    batched = scorer(prompts, completions)
    # Padding must not change a score: each text alone gives the same number as in the padded batch.
    alone = [scorer([p], [c])[0] for p, c in zip(prompts, completions)]
    assert batched == pytest.approx(alone, abs=1e-5) and batched[0] != pytest.approx(batched[1])
    ids = tok(prompts[1] + completions[1], return_tensors="pt")
    assert batched[1] == pytest.approx(rm(**ids).logits[0, 0].item(), abs=1e-5)

    from zerorl.lm.grpo import train as grpo_train

    train(_config(random_tiny_model, tmp_path / "run", max_steps=2, reward_model=str(rm_dir), critic="value_head"))
    summary = grpo_train(_config(random_tiny_model, tmp_path / "grpo", algo="grpo", max_steps=2,
                                 reward_model=str(rm_dir)))
    assert summary["models"]["reward_model"]["frozen"] == sum(p.numel() for p in rm.parameters())
    for run in ("run", "grpo"):  # PPO and GRPO alike
        for row in _metrics(tmp_path / run):
            # The reward model is the whole reward; the task's functions are still logged (weight 0).
            assert row["reward"] == pytest.approx(row["rewards/reward_model/mean"], abs=1e-5)
            assert "rewards/accuracy/mean" in row
    with pytest.raises(ConfigError, match="reward_model"):
        _config(random_tiny_model, tmp_path / "bad", reward_model=str(tmp_path / "missing"))


def test_lora_trains_only_the_adapters(random_tiny_model, digits_reward, tmp_path):
    summary = train(_config(random_tiny_model, tmp_path, max_steps=2, lora_rank=4, critic="value_head",
                            reward_funcs=[digits_reward]))
    models = summary["models"]
    # Rank 4 on q, k, v, o, gate, up, down of one layer (H = 32, one kv head of 16, MLP 160): r·(in + out) each.
    per_layer = 4 * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32) + (32 + 160) * 2 + (160 + 32))
    assert models["policy"]["trainable"] == per_layer
    assert "reference" not in models  # π_ref = the policy with its adapters switched off: no copy
    before, _ = load_model_and_tokenizer(str(random_tiny_model))
    after, _ = load_model_and_tokenizer(str(tmp_path / "final"))  # adapters merged: a plain HF model
    b, a = dict(before.named_parameters()), dict(after.named_parameters())
    assert torch.equal(b["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert not torch.equal(b["model.layers.0.self_attn.q_proj.weight"], a["model.layers.0.self_attn.q_proj.weight"])


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="critic"):
        build_config(TrainConfig, None, {"critic": "shared"})
    with pytest.raises(ConfigError, match="lam"):
        build_config(TrainConfig, None, {"lam": 1.5})
    assert isinstance(ValueHead(8)(torch.zeros(2, 3, 8)), torch.Tensor)


def test_compare_table_and_per_algorithm_overrides():
    from zerorl.lm.compare import _split_overrides, format_table, savings_lines

    shared, per_algo = _split_overrides(["max_steps=5", "ppo.learning_rate=1e-5"], ["grpo", "ppo"])
    assert shared == {"max_steps": "5"} and per_algo["ppo"]["learning_rate"] == "1e-5"
    assert per_algo["ppo"]["num_iterations"] == "2"  # the PPO recipe's default survives other overrides
    with pytest.raises(ConfigError, match="prefix"):
        _split_overrides(["sac.lr=1"], ["grpo"])
    # Every shipped recipe is a valid TrainConfig.
    from zerorl.lm.compare import DEFAULT_RECIPES

    configs = {a: build_config(TrainConfig, None, {**r, "algo": a}) for a, r in DEFAULT_RECIPES.items()}
    assert configs["trpo"].trpo_advantages == "gae" and configs["trpo"].max_kl == 0.001
    assert configs["ppo"].critic_learning_rate == configs["trpo"].critic_learning_rate == 1e-3

    before = {"accuracy_sampled": 0.40, "accuracy_greedy": 0.80}
    common = {"step_time_median": 1.0, "start_rss_kib": 1000}
    grpo = {"algo": "grpo", "models": {"policy": {"trainable": 100, "frozen": 0},
                                       "reference": {"trainable": 0, "frozen": 100}},
            "model_state_bytes": 2**20, "peak_rss_kib": 3072, "eval": {"accuracy_sampled": 0.5, "accuracy_greedy": 0.9},
            **common}
    ppo = {**grpo, "algo": "ppo", "models": {**grpo["models"], "critic": {"trainable": 100, "frozen": 0}},
           "model_state_bytes": 2 * 2**20, "peak_rss_kib": 4096}
    table = format_table(before, [grpo, ppo])
    assert "| PPO | 3: policy + reference + critic | 200 | 100 | 2.0 | 4 | 1.00 | 40.0% → 50.0% (+10.0) |" in table
    lines = savings_lines([grpo, ppo])
    assert "GRPO 200 vs PPO 300" in lines[0] and "33% fewer" in lines[0] and "(50% less)" in lines[1]


def test_lora_reference_is_the_base_model_on_the_native_forward(random_tiny_model, digits_reward, tmp_path):
    """With LoRA, π_ref is the policy with its adapters switched off: on zerorl's native forward (which calls the
    wrapped layers) its log-probs are the base model's, though the adapters are far from zero."""
    import copy

    from zerorl.lm.forward import batched_logprobs
    from zerorl.lm.lora import apply_lora
    from zerorl.lm.runtime import native_decoder
    from zerorl.lm.value_model import reference_logprobs

    policy, _, batch, config = _scored_batch(random_tiny_model, digits_reward, tmp_path, "value_head")
    base = copy.deepcopy(policy)
    expected = batched_logprobs(base, batch, config.micro_batch_size, config.temperature)
    adapters = apply_lora(policy, rank=4, alpha=16.0)
    with torch.no_grad():
        for p in adapters:
            p.normal_(0, 0.5)
    assert native_decoder(policy, config) is not None  # the path under test
    adapted = batched_logprobs(policy, batch, config.micro_batch_size, config.temperature)
    mask = batch.completion_mask.bool()
    assert (adapted - expected)[mask].abs().max() > 1e-2  # the adapters do change the policy
    reference = reference_logprobs(policy, None, batch, config)
    torch.testing.assert_close(reference[mask], expected[mask], atol=1e-5, rtol=0)
    assert all(layer.enabled for layer in policy.modules() if hasattr(layer, "enabled"))  # switched back on


@pytest.mark.parametrize("algo", ["grpo", "ppo", "trpo"])
def test_ref_model_sync_steps_refreshes_the_reference_in_every_trainer(random_tiny_model, digits_reward, tmp_path,
                                                                       algo):
    """π_ref ← π_θ every ref_model_sync_steps steps, in each trainer: after step 2 of 2 with N = 2 the final
    checkpoint's reference equals the policy, bit for bit; with N = 3 it is still the starting model."""
    import importlib

    from zerorl.checkpoint import latest_checkpoint, load_checkpoint

    trainer = importlib.import_module(f"zerorl.lm.{algo}")
    states = {}
    for sync in (2, 3):
        out = tmp_path / f"sync{sync}"
        trainer.train(_config(random_tiny_model, out, algo=algo, max_steps=2, ref_model_sync_steps=sync, beta=0.1,
                              reward_funcs=[digits_reward]))
        tensors, _ = load_checkpoint(latest_checkpoint(out / "checkpoints"))
        states[sync] = tensors
    policy, refreshed = states[2]["model"], states[2]["ref_model"]
    assert refreshed.keys() == policy.keys()
    assert all(torch.equal(refreshed[k], policy[k]) for k in policy)
    start, _ = load_model_and_tokenizer(str(random_tiny_model))
    original = start.state_dict()
    assert all(torch.equal(states[3]["ref_model"][k], original[k]) for k in original)
    assert not all(torch.equal(states[3]["model"][k], original[k]) for k in original)  # the policy did move
