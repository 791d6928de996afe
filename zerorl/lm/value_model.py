"""The models PPO adds to GRPO's pipeline: a value model (critic) and, optionally, a reward model.

    critic="separate"    V_φ = a copy of the policy's transformer + a scalar head (InstructGPT, TRL's
                         PPOTrainer): a second full model in memory, with its own gradients and Adam state
    critic="value_head"  V = a scalar head on the policy's own last hidden state (the "AutoModelForCausal-
                         LMWithValueHead" of early TRL): one backbone, one forward pass for both

The value of the state s_t = (q, o_<t) is read at the position whose logits predict o_t, so values
line up with the completion's log-probs: values[:, t] = V(q, o_<t).

``RewardModelScorer`` turns a Hugging Face sequence-classification model (num_labels=1) into a reward
function of the usual shape ``fn(prompts, completions, **columns) -> list[float]`` (the "reward model"
box of the article's PPO-vs-GRPO figure).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from torch import nn

from zerorl.config import TrainConfig
from zerorl.lm.forward import position_ids_from_mask
from zerorl.lm.parallel import CPUWorkers, run_tasks
from zerorl.optim import AdamW
from zerorl.rewards import RewardSet


class ValueHead(nn.Module):
    """hidden [..., H] → scalar [...]. Zero-initialized, so V = 0 before the first update and the first
    advantages are the plain discounted rewards (no random baseline noise)."""

    def __init__(self, hidden_size: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1, dtype=dtype)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # float32 values whatever the backbone dtype: returns and advantages are accumulated from them.
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1).float()


def completion_hidden(backbone: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                      completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states [B, Lc, H] at the positions that predict each completion token."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    prompt_length, completion_length = prompt_ids.shape[1], completion_ids.shape[1]
    # Position Lp−1+t holds the state (q, o_<t) and predicts o_t (as forward.completion_logits).
    return out.last_hidden_state[:, prompt_length - 1:prompt_length - 1 + completion_length]


class Critic(nn.Module):
    """A separate value model: the policy's transformer (copied, so it starts from the policy's features)
    plus a ``ValueHead``. It is the model GRPO does without."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.backbone = copy.deepcopy(policy.base_model)
        self.backbone.requires_grad_(True)
        self.head = ValueHead(policy.config.hidden_size, dtype=next(policy.parameters()).dtype)

    def forward(self, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
        hidden = completion_hidden(self.backbone, prompt_ids, prompt_mask, completion_ids, completion_mask)
        return self.head(hidden)


def build_critic(policy: nn.Module, kind: str) -> nn.Module:
    """``Critic`` (kind="separate") or a ``ValueHead`` that reads the policy's hidden states."""
    if kind == "separate":
        return Critic(policy)
    if kind == "value_head":
        return ValueHead(policy.config.hidden_size, dtype=next(policy.parameters()).dtype)
    raise ValueError(f"critic={kind!r} is not one of separate, value_head. Fix: set critic to one of those.")


def logits_and_values(policy: nn.Module, critic: nn.Module, micro) -> tuple[torch.Tensor, torch.Tensor]:
    """Completion logits [B, Lc, V] of the policy and values [B, Lc] of the critic for a RolloutBatch.

    With a value head, one backbone pass gives both (that is the memory/compute the head saves); with a
    separate critic, the critic runs its own transformer.
    """
    args = (micro.prompt_ids, micro.prompt_mask, micro.completion_ids, micro.completion_mask)
    if isinstance(critic, ValueHead):
        hidden = completion_hidden(policy.base_model, *args)
        return policy.get_output_embeddings()(hidden), critic(hidden)
    from zerorl.lm.forward import completion_logits

    return completion_logits(policy, *args), critic(*args)


def critic_values(policy: nn.Module, critic: nn.Module, micro) -> torch.Tensor:
    """Values [B, Lc] alone (the value head still needs the policy's backbone, not its logits)."""
    args = (micro.prompt_ids, micro.prompt_mask, micro.completion_ids, micro.completion_mask)
    if isinstance(critic, ValueHead):
        return critic(completion_hidden(policy.base_model, *args))
    return critic(*args)


class RewardModelScorer:
    """A Hugging Face ``AutoModelForSequenceClassification`` (num_labels=1) as a reward function.

    Scores the text prompt + completion; the score is the model's single logit (Bradley–Terry reward
    models, InstructGPT / TRL's RewardTrainer). Runs without gradients, in batches.
    """

    __name__ = "reward_model"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 64,
                 max_length: int | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"reward model {str(path)!r} has no config.json. Fix: pass the directory of "
                                    "a Hugging Face sequence-classification model (num_labels=1).")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModelForSequenceClassification.from_pretrained(str(path)).to(device).eval()
        self.model.requires_grad_(False)
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model {str(path)!r} has num_labels={self.model.config.num_labels}; a scalar "
                             "reward model has num_labels=1. Fix: train/export it with num_labels=1.")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # The classifier reads the last non-pad token; it must know which id is padding.
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], **columns) -> list[float]:
        texts = [str(p) + str(c) for p, c in zip(prompts, completions)]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start:start + self.batch_size], padding=True, return_tensors="pt",
                                 truncation=self.max_length is not None, max_length=self.max_length)
            logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits
            scores.extend(logits[:, 0].float().tolist())
        return scores


def parameter_counts(modules: dict[str, nn.Module | None]) -> dict[str, dict[str, int]]:
    """{name: {"trainable": n, "frozen": n}} of each model a trainer holds (shared tensors counted once)."""
    seen: set[int] = set()
    out = {}
    for name, module in modules.items():
        if module is None:
            continue
        trainable = frozen = 0
        for p in module.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.requires_grad:
                trainable += p.numel()
            else:
                frozen += p.numel()
        out[name] = {"trainable": trainable, "frozen": frozen}
    return out


def model_state_bytes(modules: dict[str, nn.Module | None], optimizer: AdamW | None) -> int:
    """Bytes of every parameter held, their gradients (trainable ones) and the optimizer's state tensors:
    the "model memory" that the article's figure counts, measured on the live objects."""
    seen: set[int] = set()
    total = 0
    for module in modules.values():
        if module is None:
            continue
        for p in module.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel() * p.element_size() * (2 if p.requires_grad else 1)  # + its gradient
    if optimizer is not None:
        for state in optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values()
                         if isinstance(v, torch.Tensor) and v.dim() > 0)
    return total


# ---------------------------------------------------------------------------------------------
# What PPO and TRPO share after the rollout: π_old and V at rollout time, token rewards, whitening
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def rollout_logprobs_and_values(policy: nn.Module, critic: nn.Module, batch, micro_batch_size: int,
                                temperature: float, workers: CPUWorkers | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """log π_old(o_t) and V(q, o_<t), both [N, Lc] float32, without autograd, in micro-batches (concurrently
    on ``workers``: each writes its own rows)."""
    from zerorl.core.logprobs import logprobs_from_logits

    modes = (policy.training, critic.training)
    policy.eval()
    critic.eval()
    shape = batch.completion_ids.shape
    logprobs = torch.zeros(shape, dtype=torch.float32, device=batch.completion_ids.device)
    values = torch.zeros_like(logprobs)

    def micro_batch(start: int) -> None:
        rows = torch.arange(start, min(start + micro_batch_size, len(batch)))
        micro = batch.select(rows)  # trimmed of all-padding columns
        width = micro.completion_ids.shape[1]
        logits, value = logits_and_values(policy, critic, micro)
        logprobs[start:start + len(rows), :width] = logprobs_from_logits(logits, micro.completion_ids, temperature)
        values[start:start + len(rows), :width] = value

    run_tasks(workers, [functools.partial(micro_batch, start) for start in range(0, len(batch), micro_batch_size)],
              forward_of=policy)
    policy.train(modes[0])
    critic.train(modes[1])
    mask = batch.completion_mask.bool()
    return logprobs * mask, values * mask


def token_level_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
                        mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """RLHF token rewards (Ziegler et al. 2019; Ouyang et al. 2022, eq. 2):

        r_t = −β · (log π_old(o_t) − log π_ref(o_t))  +  [t = last valid token] · score

    i.e. the k1 KL estimate per token as a penalty, and the sequence's scalar reward on its last token.
    ref_logprobs=None or β = 0 leaves only the score. Returns [N, Lc], 0 on padding.
    """
    from zerorl.core.kl import kl_estimate

    mask = mask.bool()
    rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if ref_logprobs is not None and kl_coef > 0:
        rewards = torch.where(mask, -kl_coef * kl_estimate(logprobs.float(), ref_logprobs.float(), "k1"), rewards)
    # Index of the last valid token of each row (rows are right-padded, the EOS is the last valid one).
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).max(dim=1).values
    has_tokens = last >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has_tokens]
    rewards[rows, last[has_tokens]] += scores.float().to(mask.device)[has_tokens]
    return rewards


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / (std + eps) over the valid tokens of the whole batch (unbiased std); 0 on padding."""
    mask = mask.bool()
    count = mask.sum()
    if count < 2:
        return torch.where(mask, values, torch.zeros_like(values))
    mean = torch.where(mask, values, torch.zeros_like(values)).sum() / count
    var = torch.where(mask, (values - mean).square(), torch.zeros_like(values)).sum() / (count - 1)
    return torch.where(mask, (values - mean) / (var.sqrt() + eps), torch.zeros_like(values))


def trainable_parameters(policy: nn.Module, critic: nn.Module | None, config: TrainConfig
                         ) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(policy parameters, critic parameters) that PPO/TRPO train: all of them, or (lora_rank > 0) the
    LoRA adapters (plus the critic's head). Call after ``build_critic``: a separate critic must copy the
    plain base weights, before the policy gets adapters."""
    from zerorl.lm.lora import apply_lora

    if config.lora_rank == 0:
        policy_params = [p for p in policy.parameters() if p.requires_grad]
        return policy_params, list(critic.parameters()) if critic is not None else []
    policy_params = apply_lora(policy, config.lora_rank, config.lora_alpha)
    if critic is None:
        return policy_params, []
    if isinstance(critic, ValueHead):
        return policy_params, list(critic.parameters())
    return policy_params, apply_lora(critic.backbone, config.lora_rank, config.lora_alpha) + list(critic.head.parameters())


def reference_model(policy: nn.Module, config: TrainConfig) -> nn.Module | None:
    """π_ref: a frozen copy of the policy when β > 0; None with LoRA (the policy with its adapters switched
    off is π_ref, no copy at all) or β = 0."""
    if config.beta > 0 and config.lora_rank == 0:
        return copy.deepcopy(policy).eval().requires_grad_(False)
    return None


def refresh_reference(ref_model: nn.Module | None, policy: nn.Module, config: TrainConfig, step: int) -> None:
    """π_ref ← π_θ after every ``ref_model_sync_steps`` steps (``step`` counts from 1; 0 = never): the
    DeepSeek-R1 / TRL ``sync_ref_model`` practice for long runs, where a reference left at the start pulls the
    policy back further and further."""
    if ref_model is not None and config.ref_model_sync_steps and step % config.ref_model_sync_steps == 0:
        ref_model.load_state_dict(policy.state_dict())


def reference_logprobs(policy: nn.Module, ref_model: nn.Module | None, batch, config: TrainConfig,
                       workers: CPUWorkers | None = None) -> torch.Tensor:
    """log π_ref of the batch: the frozen copy, or (LoRA) the policy with its adapters switched off — both on
    zerorl's native forward where supported. ``workers`` run the micro-batches concurrently."""
    from zerorl.lm.forward import batched_logprobs
    from zerorl.lm.lora import lora_disabled
    from zerorl.lm.runtime import native_decoder

    if ref_model is not None:
        return batched_logprobs(ref_model, batch, config.micro_batch_size, config.temperature,
                                native=native_decoder(ref_model, config), workers=workers)
    with lora_disabled(policy):  # the native forward calls the wrapped layers, which read the switch
        return batched_logprobs(policy, batch, config.micro_batch_size, config.temperature,
                                native=native_decoder(policy, config), workers=workers)


def training_reward_set(run, config: TrainConfig) -> tuple[RewardSet, RewardModelScorer | None]:
    """The task's reward functions, or a reward model; with a reward model the task's functions are still
    computed (weight 0) so that rewards/accuracy/mean shows whether the learned reward tracks the truth."""
    if config.reward_model is None:
        return run.reward_set, None
    scorer = RewardModelScorer(config.reward_model, device=run.device, batch_size=config.micro_batch_size)
    funcs = [("reward_model", scorer, 1.0)] + [(name, fn, 0.0) for name, fn, _ in run.reward_set.funcs]
    return RewardSet(funcs, error_policy=config.reward_errors), scorer
