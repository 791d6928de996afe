"""Rollout engines: turn prompts into sampled completions plus the log-probs they were sampled with.

`RolloutEngine` is the interface trainers use; `HFRolloutEngine` is the default, a lean decode loop
over any Hugging Face causal LM. A vLLM engine can slot in behind the same two methods.

Why a hand-written loop instead of `model.generate`:
  * for Llama / Qwen2 / Qwen3 models each step runs ``zerorl.lm.native`` (a static KV cache and
    plain tensor ops on the module's own weights) instead of the generic transformers forward;
    other architectures use the transformers forward with a ``DynamicCache``;
  * each unique prompt is prefilled once and its KV cache copied G times (GRPO samples G
    completions per prompt, so prefill work drops by G×);
  * rows that finished (EOS or stop string) are dropped from the batch, so compute shrinks as
    completions end instead of decoding padding until the longest one is done;
  * the log-prob of every sampled token is kept as it is sampled (π_old for the PPO ratio), so
    no second forward pass is needed when the trainer runs one policy update per batch.

Log-prob convention: `sampling_logprobs` = log softmax(logits / T)[token], the raw temperature-
scaled distribution, NOT renormalised after top-k/top-p truncation. That is exactly what a
trainer recomputes with `zerorl.core.logprobs.logprobs_from_logits(logits, ids, temperature=T)`,
so the ratio π_θ/π_old is 1 (up to float rounding) before the first update. For greedy decoding
(temperature 0) the log-probs are those of the T=1 distribution.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from transformers import DynamicCache

from zerorl.core.logprobs import selective_log_softmax
from zerorl.lm.forward import position_ids_from_mask
from zerorl.lm.native import (
    SMALL_WORK_FLOPS_PER_LAYER,
    THREADED_DECODE_FLOPS_PER_LAYER,
    NativeDecoder,
    layer_flops,
    threads_for,
    unsupported_reason,
)
from zerorl.lm.native_model import NativeCausalLM
from zerorl.lm.parallel import CPUWorkers, openmp_waits_passively, thread_safe_forward

FINISH_REASONS = ("stop", "eos", "length")


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. `n` is the number of completions per prompt (GRPO's group size G).

    temperature == 0 or greedy=True means argmax decoding. top_k=0 and top_p=1.0 disable those
    filters. A completion ends at an EOS token, when its text contains one of `stop_strings`
    (the stop string is kept in the text), or after `max_new_tokens` tokens.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    stop_strings: tuple[str, ...] = ("</answer>",)
    greedy: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}; use 1.0 to disable it.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}.")
        if self.n < 1:
            raise ValueError(f"n (samples per prompt) must be >= 1, got {self.n}.")
        if isinstance(self.stop_strings, str):
            raise ValueError(f"stop_strings must be a tuple of strings, got the string {self.stop_strings!r}; "
                             "write (\"...\",).")
        if any(not s for s in self.stop_strings):
            raise ValueError(f"stop_strings must not contain empty strings, got {self.stop_strings!r}.")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    @property
    def logprob_temperature(self) -> float:
        """Temperature of the distribution whose log-probs are reported (1.0 for greedy)."""
        return self.temperature if self.temperature > 0 else 1.0


@dataclass
class RolloutOutput:
    """Sampled completions for B = len(prompts) * n rows, ordered prompt-major.

    Tensors live on the model's device. Shapes: prompt_* [B, Lp] (left-padded), completion_* [B, Lc]
    (right-padded with the pad id). completion_mask is 1 for generated tokens up to and including
    the EOS token / the token that completed a stop string, 0 after.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    sampling_logprobs: torch.Tensor  # float32, 0 where completion_mask is 0
    completion_texts: list[str]
    finish_reasons: list[str]  # "stop" | "eos" | "length"
    prompt_index: torch.Tensor  # LongTensor [B]: which input prompt each row came from
    generate_seconds: float
    num_generated_tokens: int

    @property
    def tokens_per_second(self) -> float:
        return self.num_generated_tokens / max(self.generate_seconds, 1e-9)


@runtime_checkable
class RolloutEngine(Protocol):
    """What a trainer needs from a sampler."""

    def generate(self, prompts: list[str], params: SamplingParams, seed: int | None = None) -> RolloutOutput:
        """Sample params.n completions for each prompt (rows prompt-major)."""
        ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from `model`'s current weights (after an optimizer step)."""
        ...


def sample_next_token(
    logits: torch.Tensor, params: SamplingParams, uniform: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row from step logits [b, V]; return (token [b], log-prob [b] float32).

    Sampling distribution: softmax(logits / T) restricted to the top_k tokens, then to the smallest
    set whose probability reaches top_p (the most likely token is always kept).
    ``uniform`` [b] in [0, 1): each row's random number for this step (``sampling_uniforms``); drawn from
    torch's global generator when None. Ignored when greedy.
    Reported log-prob: log softmax(logits / T)[token], before any truncation (see module docstring).
    """
    if params.is_greedy:
        token = logits.argmax(dim=-1)
    else:
        scores = logits.float() / params.temperature
        if params.top_k > 0 and params.top_k < scores.shape[-1]:
            kth_best = torch.topk(scores, params.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth_best, float("-inf"))
        if params.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
            sorted_probs = sorted_scores.softmax(dim=-1)
            # Drop a token when the mass strictly before it already reaches top_p.
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            sorted_scores = sorted_scores.masked_fill(mass_before >= params.top_p, float("-inf"))
            scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
        if uniform is None:
            uniform = torch.rand(scores.shape[0], device=scores.device)
        token = inverse_cdf_sample(scores.softmax(dim=-1), uniform)
    logprob = selective_log_softmax(logits, token, temperature=params.logprob_temperature)
    return token, logprob


def inverse_cdf_sample(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One draw per row of the categorical ``probs`` [b, V] from one uniform u ∈ [0, 1) per row [b]:

        token = min{k : F_k > u · F_V},   F_k = p_1 + … + p_k,

    so P(token = k) = p_k / F_V (inverse transform sampling). A row's draw is a function of its own u
    alone, which is what lets each prompt sample from its own stream whatever the rest of the batch is.
    """
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1]
    samplable = torch.isfinite(total) & (total > 0)
    if not bool(samplable.all()):
        rows = (~samplable).nonzero().flatten().tolist()
        raise ValueError(f"next-token probabilities of rows {rows[:8]} are not finite and positive (NaN/Inf "
                         "logits: the model's weights or activations overflowed); nothing can be sampled from them")
    token = torch.searchsorted(cdf, uniform.to(cdf.dtype).unsqueeze(-1) * cdf[:, -1:], right=True).squeeze(-1)
    # Float rounding can put u · F_V on F_V itself: that is the last token with positive probability.
    last_positive = probs.shape[-1] - 1 - (probs.flip(-1) > 0).to(torch.uint8).argmax(dim=-1)
    return torch.minimum(token, last_positive)


def prompt_stream(seed: int, prompt: int) -> torch.Generator:
    """Prompt ``prompt``'s sampling stream under ``seed``: independent streams per prompt (numpy's
    SeedSequence mixes the pair)."""
    entropy = int(np.random.SeedSequence([seed, prompt]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(entropy)


def sampling_uniforms(seed: int | None, rows: torch.Tensor, n: int, max_new_tokens: int) -> torch.Tensor:
    """The random numbers of global rows ``rows`` (row r = sample r mod n of prompt r div n), one per decode
    step: [len(rows), max_new_tokens], on the CPU.

    Prompt p's stream (``prompt_stream(seed, p)``) draws a [n, max_new_tokens] block once; sample j reads
    row j of it. So a completion's draws depend on (seed, prompt, sample) only — not on how the rows are
    batched or sharded over workers, nor on which other rows finished. ``seed=None``: torch's global
    generator.
    """
    rows = rows.cpu()
    if seed is None:
        return torch.rand(len(rows), max_new_tokens)
    prompts, counts = torch.unique_consecutive(rows // n, return_counts=True)
    blocks, start = [], 0
    for prompt, count in zip(prompts.tolist(), counts.tolist()):
        block = torch.rand(n, max_new_tokens, generator=prompt_stream(seed, prompt))
        blocks.append(block[rows[start:start + count] % n])
        start += count
    return torch.cat(blocks)


def decode_on_threads(work_per_layer: float) -> bool:
    """Whether a decode step with this many FLOPs per layer runs as one batch on all the intra-op threads rather
    than as shards on single-threaded workers (THREADED_DECODE_FLOPS_PER_LAYER; never under a passive OpenMP wait
    policy, where every split op wakes sleeping threads)."""
    return torch.get_num_threads() > 1 and work_per_layer >= THREADED_DECODE_FLOPS_PER_LAYER \
        and not openmp_waits_passively()


class HFRolloutEngine:
    """Batched sampling from a live Hugging Face policy with a shared-prefix KV cache.

    `max_batch_size` caps the rows decoded together (None = all prompts * n at once); a prompt's
    samples may be split across batches. Each prompt samples from its own stream under `seed`, so the
    completions are the same whatever the batch split or worker count (up to float rounding: rows batched
    differently pad their prompts differently).
    `native=True` decodes supported architectures with ``zerorl.lm.native`` (same distribution);
    `autocast_dtype` (e.g. torch.bfloat16) runs the forward passes under CPU/CUDA autocast.
    `workers` (``zerorl.lm.parallel.CPUWorkers``): a decode step with little work per layer whose layers run
    as one TorchScript call, or any decode step under OMP_WAIT_POLICY=PASSIVE that is big enough to pay, splits
    the prompts into one shard per worker and decodes the shards at once, each on one thread; a big decode step
    otherwise runs as one batch on all the intra-op threads (``decode_on_threads``).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, max_batch_size: int | None = None,
                 native: bool = True, autocast_dtype: torch.dtype | None = None, workers: CPUWorkers | None = None):
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 or None, got {max_batch_size}.")
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.use_native = native
        self.autocast_dtype = autocast_dtype
        self.workers = workers
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise ValueError("tokenizer has neither pad_token_id nor eos_token_id; set tokenizer.pad_token.")
        self._stop_candidates: dict[tuple[str, ...], torch.Tensor] = {}
        self.sync_weights(model)

    def sync_weights(self, model: torch.nn.Module) -> None:
        """The HF engine samples from the live module, so this only (re)binds it."""
        if getattr(self, "model", None) is model:
            return  # same module: its updated weights are read live
        self.model = model
        # zerorl's own model class has no KV-cache forward: it always decodes natively.
        own_model = isinstance(model, NativeCausalLM)
        self.native = NativeDecoder(model) if (self.use_native or own_model) and unsupported_reason(model) is None \
            else None
        forward_params = inspect.signature(model.forward).parameters
        # transformers 5 renamed past_key_values -> cache; pass whichever this model takes.
        self._cache_kwarg = "cache" if "cache" in forward_params else "past_key_values"
        self._has_logits_to_keep = "logits_to_keep" in forward_params
        eos = {self.tokenizer.eos_token_id}
        generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos.update(generation_eos if isinstance(generation_eos, (list, tuple)) else [generation_eos])
        eos.discard(None)
        self.eos_ids = sorted(eos)

    # ------------------------------------------------------------------------------------------
    def generate(self, prompts: list[str], params: SamplingParams, seed: int | None = None) -> RolloutOutput:
        if isinstance(prompts, str) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings.")
        start_time = time.perf_counter()
        device = next(self.model.parameters()).device
        prompt_ids, prompt_mask = self._tokenize_left_padded(prompts, device)
        num_rows = len(prompts) * params.n
        row_prompt = torch.arange(len(prompts), device=device).repeat_interleave(params.n)
        batch_size = self.max_batch_size or num_rows
        # A big decode step runs as one batch on all the intra-op threads (each streams its share of every
        # weight; see THREADED_DECODE_FLOPS_PER_LAYER). Otherwise shards decoded at once by single-threaded
        # workers pay when a decode step is big (the matrix products release the GIL), or when its layers run
        # as one TorchScript call (which holds no GIL at all). Each prompt samples from its own stream, so the
        # shards draw what one batch would.
        work = layer_flops(self.model, min(batch_size, num_rows)) if self.native is not None else float("inf")
        threaded = self.native is not None and device.type == "cpu" and decode_on_threads(work)
        parallel = self.native is not None and not threaded and self.workers is not None \
            and self.workers.parallel and len(prompts) > 1 and thread_safe_forward(self.model)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(), self._autocast(device):
                # Built once for the whole rollout, shared by its decode batches and shards.
                weights = self.native.decode_weights(device.type) if self.native is not None else None
                parallel = parallel and (work >= SMALL_WORK_FLOPS_PER_LAYER
                                         or self.native.scripted_decode_layers(weights, device.type) is not None)
                if parallel:  # whole prompts per shard (their prefill is shared), one shard per worker
                    batch_size = min(batch_size, -(-len(prompts) // self.workers.num_workers) * params.n)
                rows = torch.arange(num_rows)
                chunks = [rows[first : first + batch_size] for first in range(0, num_rows, batch_size)]
                if parallel:
                    tasks = [functools.partial(self._decode_batch, prompt_ids, prompt_mask, chunk, params, seed,
                                               weights) for chunk in chunks]
                    outs = self.workers.run(tasks)
                else:
                    with threads_for(work):  # keeps every thread for a threaded decode (never under PASSIVE)
                        outs = [self._decode_batch(prompt_ids, prompt_mask, chunk, params, seed, weights)
                                for chunk in chunks]
        finally:
            self.model.train(was_training)
        tokens = [out[0] for out in outs]
        logprobs = [out[1] for out in outs]
        lengths = [out[2] for out in outs]
        reasons = [reason for out in outs for reason in out[3]]
        # Tensors made under inference_mode cannot be saved for backward; clone them into normal
        # tensors so the trainer can feed them to autograd (e.g. as embedding input ids).
        width = max(t.shape[1] for t in tokens)
        completion_ids = torch.cat([_pad_right(t, width, self.pad_id) for t in tokens]).clone()
        sampling_logprobs = torch.cat([_pad_right(t, width, 0.0) for t in logprobs]).clone()
        lengths_all = torch.cat(lengths).clone()
        completion_mask = (torch.arange(width, device=device)[None, :] < lengths_all[:, None]).long()
        completion_texts = self._completion_texts(completion_ids, lengths_all, params.stop_strings)
        return RolloutOutput(
            prompt_ids=prompt_ids[row_prompt].clone(),
            prompt_mask=prompt_mask[row_prompt].clone(),
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            sampling_logprobs=sampling_logprobs,
            completion_texts=completion_texts,
            finish_reasons=reasons,
            prompt_index=row_prompt.clone(),
            generate_seconds=time.perf_counter() - start_time,
            num_generated_tokens=int(lengths_all.sum()),
        )

    def _autocast(self, device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------------------------------
    def _tokenize_left_padded(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = self.tokenizer(list(prompts))["input_ids"]
        for index, ids in enumerate(encoded):
            if len(ids) == 0:
                raise ValueError(f"prompt {index} ({prompts[index]!r}) tokenizes to zero tokens; "
                                 "every prompt needs at least one token.")
        width = max(len(ids) for ids in encoded)
        prompt_ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        prompt_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            prompt_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            prompt_mask[row, width - len(ids) :] = 1
        return prompt_ids.to(device), prompt_mask.to(device)

    def _decode_batch(self, all_prompt_ids, all_prompt_mask, rows, params, seed, weights=None):
        """Decode the global rows ``rows`` (row r = sample r mod n of prompt r div n), prompt-major, each row
        drawing from its prompt's stream under ``seed`` (``sampling_uniforms``).

        Returns (tokens [b, Lc], logprobs [b, Lc], lengths [b], finish reasons).
        """
        device = all_prompt_ids.device
        row_prompt = rows.to(device) // params.n
        unique_prompts, expand = torch.unique_consecutive(row_prompt, return_inverse=True)
        prompt_ids, prompt_mask = all_prompt_ids[unique_prompts], all_prompt_mask[unique_prompts]
        first_real = int((prompt_mask.sum(0) > 0).nonzero()[0])  # drop columns that are padding in every row
        prompt_ids, prompt_mask = prompt_ids[:, first_real:], prompt_mask[:, first_real:]
        uniforms = None if params.is_greedy \
            else sampling_uniforms(seed, rows, params.n, params.max_new_tokens).to(device)

        # Prefill each distinct prompt once; its keys and values are shared by its samples.
        if self.native is not None:
            logits, state = self.native.start_decoding(prompt_ids, prompt_mask, expand, params.max_new_tokens,
                                                       weights)
        else:
            logits, state = _TransformersDecodeState.start(self, prompt_ids, prompt_mask, expand)

        num_rows, max_new = len(rows), params.max_new_tokens
        tokens = torch.full((num_rows, max_new), self.pad_id, dtype=torch.long, device=device)
        logprobs = torch.zeros((num_rows, max_new), dtype=torch.float32, device=device)
        lengths = torch.full((num_rows,), max_new, dtype=torch.long, device=device)
        reasons = ["length"] * num_rows
        active = torch.arange(num_rows, device=device)  # original row of each active slot
        eos_ids = torch.tensor(self.eos_ids, dtype=torch.long, device=device)
        stop_candidates = self._stop_candidate_table(params.stop_strings, logits.shape[-1], device)
        window = max((len(s.encode("utf-8")) for s in params.stop_strings), default=0) + 1

        for step in range(max_new):
            token, logprob = sample_next_token(logits, params, None if uniforms is None else uniforms[active, step])
            tokens[active, step] = token
            logprobs[active, step] = logprob
            finished = torch.isin(token, eos_ids)
            for slot in finished.nonzero().flatten().tolist():
                reasons[int(active[slot])] = "eos"
            if stop_candidates is not None:
                # Only rows whose new token could end a stop string are decoded (cheap filter first).
                maybe_stop = stop_candidates[token] & ~finished
                for slot in maybe_stop.nonzero().flatten().tolist():
                    row = int(active[slot])
                    tail_ids = tokens[row, max(0, step + 1 - window) : step + 1].tolist()
                    tail = self.tokenizer.decode(tail_ids, skip_special_tokens=True)
                    if any(stop in tail for stop in params.stop_strings):
                        finished[slot] = True
                        reasons[row] = "stop"
            if finished.any():
                lengths[active[finished]] = step + 1
                keep = compaction_order(finished)
                if keep.numel() == 0:
                    break
                # Drop finished rows from the batch: later steps only compute unfinished ones.
                state.keep(keep)
                token, active = token[keep], active[keep]
            if step == max_new - 1:
                break
            logits = state.step(token)

        width = int(lengths.max())
        return tokens[:, :width], logprobs[:, :width], lengths, reasons

    def _stop_candidate_table(self, stop_strings, vocab_size: int, device) -> torch.Tensor | None:
        """Bool [V]: True for tokens that might complete a stop string, so only those get decoded.

        A stop string s appears when a token is appended only if the occurrence ends inside the token's
        text t: s lies within t, or t starts with a proper suffix s[k:] of it (the rest, s[:k], ending the
        text before). Tokens whose lone decode is empty or partial UTF-8 (byte-level pieces) are always
        candidates, which keeps the filter conservative. (A looser rule — t holds s's last character —
        made every one of a padded vocabulary's `<|filler_i|>` tokens a candidate for "</answer>".)
        """
        if not stop_strings:
            return None
        key = tuple(stop_strings)
        if key not in self._stop_candidates:
            last_chars = {stop[-1] for stop in stop_strings}
            known = min(vocab_size, len(self.tokenizer))
            texts = self.tokenizer.batch_decode([[i] for i in range(known)], skip_special_tokens=True)
            table = torch.ones(vocab_size, dtype=torch.bool)  # ids beyond the tokenizer: always check
            table[:known] = torch.tensor(
                [(not text) or ("\ufffd" in text)
                 or (any(c in text for c in last_chars)  # the cheap test first
                     and any(can_complete(text, stop) for stop in stop_strings)) for text in texts]
            )
            self._stop_candidates[key] = table
        return self._stop_candidates[key].to(device)

    def _completion_texts(self, completion_ids, lengths, stop_strings) -> list[str]:
        id_lists = [ids[:length].tolist() for ids, length in zip(completion_ids, lengths.tolist())]
        texts = self.tokenizer.batch_decode(id_lists, skip_special_tokens=True)
        return [cut_at_stop(text, stop_strings) for text in texts]


class _TransformersDecodeState:
    """Decoding through the model's own transformers forward and a ``DynamicCache`` (any architecture)."""

    def __init__(self, engine: HFRolloutEngine, cache, attention_mask, next_position):
        self.engine, self.cache = engine, cache
        self.attention_mask, self.next_position = attention_mask, next_position

    @classmethod
    def start(cls, engine: HFRolloutEngine, prompt_ids, prompt_mask, expand):
        # Left padding shifts tokens right; positions must count real tokens only, so that a padded
        # row sees the same rotary positions as the same prompt run alone.
        position_ids = position_ids_from_mask(prompt_mask)
        cache = DynamicCache(config=engine.model.config)
        logits = cls._forward(engine, prompt_ids, prompt_mask, position_ids, cache)[expand]
        cache.batch_select_indices(expand)
        return logits, cls(engine, cache, prompt_mask[expand], position_ids[expand, -1] + 1)

    @staticmethod
    def _forward(engine, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        """Last-position logits [b, V] of one forward pass that extends `cache` in place."""
        kwargs = {engine._cache_kwarg: cache, "use_cache": True}
        if engine._has_logits_to_keep:
            kwargs["logits_to_keep"] = 1  # never materialise [b, T, V] logits in the prefill
        out = engine.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        return out.logits[:, -1, :]

    def keep(self, index: torch.Tensor) -> None:
        self.cache.batch_select_indices(index)
        self.attention_mask, self.next_position = self.attention_mask[index], self.next_position[index]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones((len(tokens), 1))], 1)
        logits = self._forward(self.engine, tokens[:, None], self.attention_mask, self.next_position[:, None],
                               self.cache)
        self.next_position = self.next_position + 1
        return logits


def compaction_order(finished: torch.Tensor) -> torch.Tensor:
    """The batch slots to keep once ``finished`` [b] rows leave, ordered so that as few rows as possible move: the
    live slots below the new size stay where they are, and the live slots beyond it fill the finished ones below
    it. A decode state can then move those few rows and cut its tensors to the new size in place
    (``DecodeState.keep``), instead of copying every layer's KV cache to drop a row."""
    live = ~finished
    size = int(live.sum())
    order = torch.arange(size, device=finished.device)
    order[finished[:size]] = live[size:].nonzero().flatten() + size
    return order


def can_complete(token_text: str, stop: str) -> bool:
    """Whether appending a token whose text is ``token_text`` can complete ``stop``: the stop string lies
    within the token's text, or the text starts with a proper suffix of it."""
    return stop in token_text or any(token_text.startswith(stop[k:]) for k in range(1, len(stop)))


def cut_at_stop(text: str, stop_strings) -> str:
    """Cut `text` right after the earliest-ending stop string (kept); unchanged if none occurs."""
    ends = [text.find(stop) + len(stop) for stop in stop_strings if stop in text]
    return text[: min(ends)] if ends else text


def _pad_right(tensor: torch.Tensor, width: int, value) -> torch.Tensor:
    if tensor.shape[1] == width:
        return tensor
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)


__all__ = [
    "FINISH_REASONS",
    "HFRolloutEngine",
    "RolloutEngine",
    "RolloutOutput",
    "SamplingParams",
    "can_complete",
    "compaction_order",
    "cut_at_stop",
    "decode_on_threads",
    "inverse_cdf_sample",
    "prompt_stream",
    "sample_next_token",
    "sampling_uniforms",
]
