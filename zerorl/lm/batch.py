"""The one data structure that flows through an LM training step.

A ``RolloutBatch`` is filled stage by stage: the rollout engine gives token ids, masks and sampling
log-probs; the reward stage adds rewards; the advantage stage adds advantages; the reference model
adds reference log-probs; PPO adds values and returns. Trainers slice it into micro-batches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass
class RolloutBatch:
    prompt_ids: torch.Tensor  # [N, Lp] left-padded
    prompt_mask: torch.Tensor  # [N, Lp]
    completion_ids: torch.Tensor  # [N, Lc] right-padded
    completion_mask: torch.Tensor  # [N, Lc] 1 on generated tokens (through EOS / stop string)
    sampling_logprobs: torch.Tensor  # [N, Lc] log π_old(token) as sampled (logits / temperature)
    prompt_index: torch.Tensor  # [N] which prompt of the step each completion answers
    completion_texts: list[str] = field(default_factory=list)
    rewards: torch.Tensor | None = None  # [N] weighted total
    reward_components: dict[str, torch.Tensor] = field(default_factory=dict)  # name → [N]
    advantages: torch.Tensor | None = None  # [N] (outcome) or [N, Lc] (token-level, PPO)
    old_logprobs: torch.Tensor | None = None  # [N, Lc] π_old under the training forward pass
    ref_logprobs: torch.Tensor | None = None  # [N, Lc] π_ref
    values: torch.Tensor | None = None  # [N, Lc] critic values (PPO)
    returns: torch.Tensor | None = None  # [N, Lc] GAE returns (PPO)
    finish_reasons: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    def select(self, index: torch.Tensor) -> RolloutBatch:
        """Rows ``index`` of every per-sample field, trimmed of columns that are padding in all rows.

        Trimming is what makes micro-batches cheap: a micro-batch of short completions does not pay
        for the longest completion of the whole step.
        """
        index = index.to(self.completion_ids.device)
        picked = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                picked[f.name] = value.index_select(0, index.to(value.device))
            elif isinstance(value, dict):
                picked[f.name] = {k: v.index_select(0, index.to(v.device)) for k, v in value.items()}
            elif isinstance(value, list) and value:
                picked[f.name] = [value[i] for i in index.tolist()]
            else:
                picked[f.name] = value
        sub = RolloutBatch(**picked)
        return sub.trimmed()

    def trimmed(self) -> RolloutBatch:
        """Drop leading prompt columns and trailing completion columns that are padding everywhere."""
        prompt_keep = self.prompt_mask.any(dim=0).nonzero()
        prompt_start = int(prompt_keep[0]) if len(prompt_keep) else self.prompt_mask.shape[1]
        completion_keep = self.completion_mask.any(dim=0).nonzero()
        completion_end = int(completion_keep[-1]) + 1 if len(completion_keep) else 1
        if prompt_start == 0 and completion_end == self.completion_mask.shape[1]:
            return self
        changes = {"prompt_ids": self.prompt_ids[:, prompt_start:],
                   "prompt_mask": self.prompt_mask[:, prompt_start:]}
        for name in ("completion_ids", "completion_mask", "sampling_logprobs", "old_logprobs",
                     "ref_logprobs", "values", "returns"):
            value = getattr(self, name)
            if value is not None:
                changes[name] = value[:, :completion_end]
        if self.advantages is not None and self.advantages.dim() == 2:
            changes["advantages"] = self.advantages[:, :completion_end]
        return dataclasses.replace(self, **changes)

    def micro_batches(self, size: int, generator: torch.Generator | None = None,
                      shuffle: bool = False) -> list[RolloutBatch]:
        """Split into micro-batches of at most ``size`` rows (optionally in a seeded random order)."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        return [self.select(order[i:i + size]) for i in range(0, n, size)]
