"""Per-token log-probabilities of completions under a model (policy, old policy or reference).

Only the completion positions are turned into logits (``logits_to_keep``), and log-probs are taken
with the chunked selective log-softmax of ``zerorl.core.logprobs``, so no float32 [B, T, V]
log-softmax is ever materialized.

Pass ``native`` (a ``zerorl.lm.native.NativeDecoder`` of the same model) to compute the same logits
with each prompt encoded once per group and no padding in the linear layers.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from zerorl.core.logprobs import entropy_from_logits, logprobs_from_logits
from zerorl.lm.parallel import CPUWorkers, run_tasks

if TYPE_CHECKING:  # zerorl.lm.native imports position_ids_from_mask from here
    from zerorl.lm.native import NativeDecoder


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: the first real token is position 0 in every row."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def completion_logits(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                      completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                      native: NativeDecoder | None = None) -> torch.Tensor:
    """Logits [B, Lc, V] that predict each completion token (position t predicts token t+1)."""
    if native is not None:
        return native.completion_logits(prompt_ids, prompt_mask, completion_ids, completion_mask)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    completion_length = completion_ids.shape[1]
    output = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask),
                   logits_to_keep=completion_length + 1, use_cache=False)
    # The last kept position predicts a token after the completion: drop it.
    return output.logits[:, :-1, :]


def completion_logprobs(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                        completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                        temperature: float = 1.0, with_entropy: bool = False,
                        native: NativeDecoder | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(o_t | q, o_<t) for every completion token, at the sampling temperature.

    Returns (logprobs [B, Lc], entropy [B, Lc] or None). Entropy is detached: it is a metric.
    """
    logits = completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask, native)
    logprobs = logprobs_from_logits(logits, completion_ids, temperature=temperature)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = entropy_from_logits(logits.detach() / temperature)
    return logprobs, entropy


@torch.no_grad()
def batched_logprobs(model: torch.nn.Module, batch, micro_batch_size: int, temperature: float,
                     native: NativeDecoder | None = None, workers: CPUWorkers | None = None) -> torch.Tensor:
    """Log-probs [N, Lc] of a whole RolloutBatch without autograd (old policy or reference).

    With ``workers``, micro-batches run concurrently, each on one thread (the numbers a one-thread serial
    pass gives)."""
    was_training = model.training
    model.eval()
    out = torch.zeros(batch.completion_ids.shape, dtype=torch.float32, device=batch.completion_ids.device)

    def micro_batch(start: int) -> None:
        rows = slice(start, start + micro_batch_size)
        mask = batch.completion_mask[rows]
        width = int(mask.sum(dim=0).nonzero().max()) + 1 if mask.any() else 1
        logprobs, _ = completion_logprobs(model, batch.prompt_ids[rows], batch.prompt_mask[rows],
                                          batch.completion_ids[rows, :width], mask[:, :width],
                                          temperature=temperature, native=native)
        out[rows, :width] = logprobs.float()  # disjoint rows: safe from concurrent workers

    run_tasks(workers, [functools.partial(micro_batch, start) for start in range(0, len(batch), micro_batch_size)],
              forward_of=model)
    model.train(was_training)
    return out
