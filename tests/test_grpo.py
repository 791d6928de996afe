"""End-to-end GRPO on tiny models built in the test: learning, exact on-policy ratio, a second architecture."""

import json
import random

import pytest
import torch

from zerorl.config import TrainConfig, build_config
from zerorl.lm.grpo import train
from zerorl.lm.models import build_tiny_model
from zerorl.lm.sft import SFTConfig, run_sft
from zerorl.tasks import get_task

TASK_ARGS = {"max_digits": 2, "operators": "+", "num_eval": 8, "slip_kind": "carry"}


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A small cold-start model on 2-digit addition: it writes the R1 format, its traces run ~48 characters."""
    config = SFTConfig(task="arithmetic", task_args=TASK_ARGS, hidden_size=64,
                       num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=192, steps=200,
                       batch_size=32, learning_rate=3e-3, error_rate=0.7, progress=False)
    return run_sft(config, tmp_path_factory.mktemp("base") / "model")


def _config(model, out, **overrides) -> TrainConfig:
    values = {"model": str(model), "task": "arithmetic", "task_args": TASK_ARGS,
              "output_dir": str(out), "num_eval": 8, "eval_samples_per_prompt": 2, "prompts_per_step": 8,
              "num_generations": 8, "max_completion_length": 56, "progress": False, "plots": False,
              "save_steps": 0, "learning_rate": 1e-4, "warmup_steps": 0}
    values.update(overrides)
    return build_config(TrainConfig, None, values)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_grpo_raises_the_mean_reward(base_model, tmp_path):
    # The easy task: a 46-token budget is shorter than most of the 45-50-character traces SFT taught, so
    # about half the completions do not close their tags in time and earn no format reward. Only those that
    # finish early score; group-relative advantages make the policy finish early within a few steps.
    steps = 24
    summary = train(_config(base_model, tmp_path, max_steps=steps, beta=0.0, eval_at_start=False,
                            eval_at_end=False, max_completion_length=46, learning_rate=5e-4))
    rows = _metrics(tmp_path)
    assert len(rows) == steps and summary["algo"] == "grpo"
    first = sum(r["reward"] for r in rows[:4]) / 4
    last = sum(r["reward"] for r in rows[-4:]) / 4
    assert last > first + 0.12, (first, last)  # 4 steps × 64 completions: σ of a mean ≈ 0.03
    assert rows[-1]["completions/clipped_ratio"] < rows[0]["completions/clipped_ratio"]


def test_on_policy_ratio_is_exactly_one(base_model, tmp_path):
    train(_config(base_model, tmp_path, max_steps=2, eval_at_start=False, eval_at_end=False))
    for row in _metrics(tmp_path):
        assert row["ratio_mean"] == 1.0 and row["ratio_min"] == 1.0 and row["ratio_max"] == 1.0
        assert row["clip_ratio"] == 0.0


def test_off_policy_minibatches_move_the_ratio(base_model, tmp_path):
    # μ = 2 passes, 2 minibatches: π_old is computed once, the policy moves, later minibatches see r ≠ 1.
    train(_config(base_model, tmp_path, max_steps=2, num_iterations=2, num_minibatches=2,
                  eval_at_start=False, eval_at_end=False))
    rows = _metrics(tmp_path)
    assert any(abs(r["ratio_max"] - 1.0) > 1e-4 or abs(r["ratio_min"] - 1.0) > 1e-4 for r in rows)


def test_outputs_of_a_run(base_model, tmp_path):
    summary = train(_config(base_model, tmp_path, max_steps=2, plots=True))
    for key in ("eval_before", "eval_after"):
        assert set(summary[key]) >= {"accuracy_sampled", "accuracy_greedy", "n"} and summary[key]["n"] == 8
    assert summary["wall_seconds"] > 0
    # The models held: the policy (all trainable) and its frozen copy, π_ref; their parameters, gradients and
    # Adam's two moments: 4 bytes × (2 + 2) per policy parameter and 4 per reference parameter.
    policy = summary["models"]["policy"]
    assert policy["frozen"] == 0 and summary["models"]["reference"] == {"trainable": 0,
                                                                        "frozen": policy["trainable"]}
    assert summary["model_state_bytes"] == 4 * (4 + 1) * policy["trainable"]
    for name in ("metrics.jsonl", "summary.json", "config.yaml", "training.png", "final/config.json",
                 "final/model.safetensors", "final/tokenizer.json"):
        assert (tmp_path / name).exists(), name
    row = _metrics(tmp_path)[0]
    for key in ("reward", "reward_std", "rewards/accuracy/mean", "rewards/format/mean", "kl", "clip_ratio",
                "entropy", "completions/mean_length", "completions/clipped_ratio", "grad_norm",
                "learning_rate", "step_time"):
        assert key in row, key


def test_second_architecture_with_bpe_and_chat_template(tmp_path):
    model_dir = build_tiny_model(tmp_path / "llama", arch="llama", tokenizer="bpe", hidden_size=64,
                                 num_layers=2, num_heads=2, num_kv_heads=1, seed=1)
    config = _config(model_dir, tmp_path / "run", max_steps=2, template="chat", eval_at_start=False,
                     prompts_per_step=2, num_generations=4, max_completion_length=16, num_eval=4)
    summary = train(config)
    rows = _metrics(tmp_path / "run")
    assert len(rows) == 2 and all(r["completions/mean_length"] > 0 for r in rows)
    assert summary["eval_after"]["n"] == 4


def test_cold_start_traces_leave_room_to_learn():
    # The SFT data is imperfect by design: about error_rate of the traces end in a wrong answer.
    task = get_task("arithmetic", seed=0)
    accuracy = task.accuracy_reward()
    rng = random.Random(0)
    rows = [task.train_row(i) for i in range(400)]
    completions = [task.cold_start_completion(r, rng, error_rate=0.3) for r in rows]
    scores = accuracy([r["prompt"] for r in rows], completions, answer=[r["answer"] for r in rows])
    assert 0.6 < sum(scores) / len(scores) < 0.8


def test_grpo_loss_matches_the_plain_formula(base_model):
    """The trainer's micro-batch loss equals the article's J_GRPO written out plainly (β = 0.04, k3)."""
    from zerorl.lm.batch import RolloutBatch
    from zerorl.lm.grpo import grpo_loss
    from zerorl.lm.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(base_model))
    torch.manual_seed(0)
    prompt = tok(["3+4=?\n", "12+5=?\n"], padding=True, return_tensors="pt")
    completion_ids = torch.randint(2, 40, (2, 5))
    completion_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    config = _config(base_model, "unused", beta=0.04)
    old = torch.randn(2, 5) * 0.1 - 2.0
    ref = torch.randn(2, 5) * 0.1 - 2.0
    batch = RolloutBatch(prompt_ids=prompt["input_ids"], prompt_mask=prompt["attention_mask"],
                         completion_ids=completion_ids, completion_mask=completion_mask,
                         sampling_logprobs=old, prompt_index=torch.tensor([0, 1]),
                         advantages=torch.tensor([1.0, -0.5]), old_logprobs=old, ref_logprobs=ref)
    loss, _ = grpo_loss(model, batch, config, on_policy=False)

    # Plain version: full log-softmax, explicit loops over sequences and tokens.
    ids = torch.cat([batch.prompt_ids, completion_ids], 1)
    mask = torch.cat([batch.prompt_mask, completion_mask], 1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    lp = torch.log_softmax(logits[:, batch.prompt_ids.shape[1] - 1:-1] / config.temperature, -1)
    lp = lp.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    total = 0.0
    for i in range(2):
        n = int(completion_mask[i].sum())
        per_token = 0.0
        for t in range(n):
            r = torch.exp(lp[i, t] - old[i, t])
            a = batch.advantages[i]
            surrogate = torch.minimum(r * a, torch.clamp(r, 0.8, 1.2) * a)
            kl = torch.exp(ref[i, t] - lp[i, t]) - (ref[i, t] - lp[i, t]) - 1
            per_token = per_token + (-surrogate + 0.04 * kl)
        total = total + per_token / n
    assert torch.allclose(loss, total / 2, atol=1e-5)


@pytest.mark.parametrize("algo", ["grpo", "ppo", "trpo"])
def test_an_out_of_process_engine_gets_the_weights_after_every_update(base_model, tmp_path, monkeypatch, algo):
    """use_vllm: each trainer must push the policy's weights to the engine after each update. A stand-in
    with vLLM's constructor and its own copy of the model (as a vLLM worker holds) records the syncs;
    without them it would keep sampling from the base weights."""
    import importlib

    import zerorl.lm.vllm_engine as vllm_engine
    from zerorl.lm.models import load_model_and_tokenizer
    from zerorl.lm.rollout import HFRolloutEngine

    syncs = []

    class EngineWithItsOwnWeights:
        def __init__(self, model_path, tokenizer, dtype="auto", gpu_memory_utilization=0.3, seed=0):
            self.copy, _ = load_model_and_tokenizer(str(model_path))
            self.inner = HFRolloutEngine(self.copy, tokenizer)

        def generate(self, prompts, params, seed=None):
            return self.inner.generate(prompts, params, seed)

        @torch.no_grad()
        def sync_weights(self, model):
            self.copy.load_state_dict(model.state_dict())
            syncs.append(1)

    monkeypatch.setattr(vllm_engine, "VLLMRolloutEngine", EngineWithItsOwnWeights)
    trainer = importlib.import_module(f"zerorl.lm.{algo}").train
    settings = dict(max_steps=3, eval_at_start=False, eval_at_end=False, learning_rate=1e-3, algo=algo,
                    max_kl=0.01)
    trainer(_config(base_model, tmp_path / "vllm", use_vllm=True, **settings))
    assert len(syncs) == 3
    # The same run with the in-process engine samples the same completions (same weights at every step).
    trainer(_config(base_model, tmp_path / "hf", **settings))
    with_sync, in_process = _metrics(tmp_path / "vllm"), _metrics(tmp_path / "hf")
    assert [r["reward"] for r in with_sync] == [r["reward"] for r in in_process]
    assert [r["completions/mean_length"] for r in with_sync] == [r["completions/mean_length"] for r in in_process]


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_gradients_are_freed_before_the_next_rollout(base_model, tmp_path, monkeypatch, algo):
    """A step's gradients are spent once the optimizer has stepped: the next rollout and reference pass must
    not carry a parameter-sized buffer of them (126 MB on the 31.5M benchmark model)."""
    import importlib

    trainer_module = importlib.import_module(f"zerorl.lm.{algo}")
    from zerorl.lm import runtime

    grads_at_rollout = []
    original_build = runtime.build_engine

    def build_engine(config, model, *args, **kwargs):
        engine = original_build(config, model, *args, **kwargs)
        original_generate = engine.generate

        def generate(*a, **k):
            grads_at_rollout.append(sum(p.grad is not None for p in model.parameters()))
            return original_generate(*a, **k)

        engine.generate = generate
        return engine

    monkeypatch.setattr(runtime, "build_engine", build_engine)
    trainer_module.train(_config(base_model, tmp_path / algo, max_steps=3, eval_at_start=False,
                                 eval_at_end=False, learning_rate=1e-3, algo=algo))
    assert len(grads_at_rollout) == 3 and grads_at_rollout == [0, 0, 0]


def test_rewards_and_advantages_live_on_the_completions_device():
    # On a GPU the loss combines the advantages with CUDA log-probs token by token, and torch mixes devices only
    # for 0-dim CPU tensors: the scores must be made where the completions are. The meta device stands in for
    # CUDA (no GPU in CI): an engine whose tensors live there.
    from zerorl.lm.grpo import compute_advantages
    from zerorl.lm.pipeline import PromptBatch, rollout_and_score
    from zerorl.lm.rollout import RolloutOutput, SamplingParams
    from zerorl.lm.runtime import build_reward_set

    class EngineOnAnotherDevice:
        def generate(self, prompts, params, seed=None):
            rows = len(prompts) * params.n
            ids = torch.zeros(rows, 4, dtype=torch.long, device="meta")
            return RolloutOutput(prompt_ids=ids, prompt_mask=ids, completion_ids=ids, completion_mask=ids,
                                 sampling_logprobs=torch.zeros(rows, 4, device="meta"),
                                 completion_texts=["<think>x</think><answer>5</answer>"] * rows,
                                 finish_reasons=["stop"] * rows,
                                 prompt_index=torch.arange(len(prompts)).repeat_interleave(params.n),
                                 generate_seconds=0.1, num_generated_tokens=4 * rows)

    task = get_task("arithmetic", seed=0)
    rows = [task.train_row(i) for i in range(2)]
    config = TrainConfig(num_generations=2)
    batch, _ = rollout_and_score(EngineOnAnotherDevice(), PromptBatch(rows=rows, texts=[r["prompt"] for r in rows]),
                                 SamplingParams(n=2), build_reward_set(task, config), seed=0)
    assert batch.rewards.device.type == "meta" and batch.rewards.shape == (4,)
    assert batch.reward_components and all(v.device.type == "meta" for v in batch.reward_components.values())
    assert compute_advantages(batch, config).device.type == "meta"


def test_grpo_with_lora_trains_only_the_adapters_against_the_base(random_tiny_model, digits_reward, tmp_path):
    """lora_rank > 0: adapters on the linear layers are all GRPO trains, π_ref is the policy with them switched
    off (B starts at zero, so the first step's KL is 0 up to rounding), and final/ has them merged."""
    from zerorl.config import ConfigError
    from zerorl.lm.models import load_model_and_tokenizer

    summary = train(_config(random_tiny_model, tmp_path, max_steps=3, lora_rank=4, beta=0.1, eval_at_start=False,
                            eval_at_end=False, template="compact", max_completion_length=12, learning_rate=1e-2,
                            reward_funcs=[digits_reward]))
    # Rank 4 on q, k, v, o, gate, up, down of one layer (H = 32, one kv head of 16, MLP 160): r·(in + out) each.
    per_layer = 4 * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32) + (32 + 160) * 2 + (160 + 32))
    assert summary["models"]["policy"]["trainable"] == per_layer
    assert "reference" not in summary["models"]  # π_ref = the policy with its adapters off: no copy
    rows = _metrics(tmp_path)
    assert len(rows) == 3
    assert rows[0]["kl"] < 1e-9  # the policy is still the base model: the reference (up to rounding)
    assert rows[-1]["kl"] > 0.0  # the adapters moved it
    before, _ = load_model_and_tokenizer(str(random_tiny_model))
    after, _ = load_model_and_tokenizer(str(tmp_path / "final"))  # a plain HF model
    b, a = dict(before.named_parameters()), dict(after.named_parameters())
    assert b.keys() == a.keys()  # no adapter left behind
    for name in b:  # only the wrapped linear layers moved: embeddings and norms are not trained
        moved = not torch.equal(b[name], a[name])
        assert moved == name.endswith(("_proj.weight",)), name
    with pytest.raises(ConfigError, match="ref_model_sync_steps"):
        _config(random_tiny_model, tmp_path / "bad", lora_rank=4, ref_model_sync_steps=10)
