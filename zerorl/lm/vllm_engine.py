"""A vLLM rollout engine behind the `RolloutEngine` interface of rollout.py (optional: `pip install zerorl[vllm]`).

vLLM samples G completions per prompt with paged attention and continuous batching on a GPU; the trainer
keeps its own Hugging Face copy of the policy for the gradient, and pushes its weights into vLLM after
every optimizer step (`sync_weights`). vLLM is imported only when this engine is built, so the CPU path
never needs it; without it, building the engine raises `VLLMNotInstalledError` with the fix.

Same conventions as `HFRolloutEngine`, so a trainer cannot tell the two apart:
  * rows are prompt-major (prompt i owns rows i·n … i·n + n − 1), `prompt_index` says which prompt;
  * prompts are tokenized by the trainer's tokenizer and handed to vLLM as token ids, so both engines
    and the trainer see the same prompt tokens; `prompt_ids` are left-padded with the pad id;
  * `completion_ids` are right-padded; `completion_mask` is 1 through the EOS token or the token that
    completed a stop string; the text keeps the stop string and is cut right after it;
  * finish reasons: "eos", "stop" (a stop string), "length".

Log-probs. vLLM computes them from the logits its sampler actually used when the engine is started with
`logprobs_mode="processed_logprobs"` (vLLM ≥ 0.10.2; the default "raw_logprobs" would report the
T = 1 distribution): log softmax(logits / T) after top-k / top-p truncation, renormalised over the kept
tokens. zerorl's convention is log softmax(logits / T)[token] *before* truncation. The two are equal
whenever top_k = 0 and top_p = 1 (zerorl's GRPO defaults); with truncation active vLLM's value is
higher by −log(probability mass kept), and this engine warns once. `logprobs=0` asks for the sampled
token's log-prob only. Greedy decoding (temperature 0) reports the T = 1 distribution, as the HF engine.

Weight sync. `sync_weights(model)` streams `model.state_dict()` into the engine's model with vLLM's own
`load_weights` (the Hugging Face parameter names; vLLM fuses q/k/v and gate/up as it loads), through the
in-process worker when there is one (what TRL's colocate mode does: `llm.llm_engine.model_executor.
driver_worker.model_runner.model.load_weights`), else through `LLM.collective_rpc`. Then the prefix
cache is reset, since cached prompt KV belongs to the old weights. This engine sets
VLLM_ENABLE_V1_MULTIPROCESSING=0 (unless already set) so the worker lives in this process.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

import torch

from zerorl.lm.rollout import RolloutOutput, SamplingParams, cut_at_stop

INSTALL_HINT = "pip install 'zerorl[vllm]'"


class VLLMNotInstalledError(ImportError):
    """vLLM is an optional dependency; the message says how to install it."""


def import_vllm():
    """The vllm module, or VLLMNotInstalledError with the fix."""
    try:
        import vllm
    except ImportError as error:
        raise VLLMNotInstalledError(
            f"the vLLM rollout engine needs the optional package vllm, which could not be imported ({error}). "
            f"Fix: {INSTALL_HINT} on a Linux machine with an NVIDIA GPU, or keep the default Hugging Face "
            "engine (HFRolloutEngine), which needs nothing extra.") from error
    return vllm


def finish_reason(vllm_reason: str | None, stop_reason: Any) -> str:
    """vLLM's (finish_reason, stop_reason) → zerorl's "eos" | "stop" | "length".

    vLLM says "stop" both for an EOS / stop token (stop_reason None or the token id) and for a stop string
    (stop_reason the string).
    """
    if vllm_reason == "length":
        return "length"
    if vllm_reason == "stop":
        return "stop" if isinstance(stop_reason, str) else "eos"
    raise RuntimeError(f"vLLM finished a completion with reason {vllm_reason!r} (stop_reason {stop_reason!r}); "
                       "expected 'stop' or 'length'. An 'abort' means the engine dropped the request.")


def sampled_logprobs(token_ids, logprobs) -> list[float]:
    """The log-prob of each sampled token from vLLM's per-position {token id: Logprob} entries."""
    if logprobs is None:
        raise RuntimeError("vLLM returned no log-probs; the request must set SamplingParams(logprobs=0).")
    return [float(logprobs[position][token].logprob) for position, token in enumerate(token_ids)]


def rollout_from_vllm(request_outputs, prompt_token_ids: list[list[int]], n: int, pad_id: int,
                      stop_strings, generate_seconds: float, device: torch.device | str = "cpu") -> RolloutOutput:
    """Assemble vLLM's RequestOutputs (one per prompt, each with n CompletionOutputs) into a RolloutOutput."""
    if len(request_outputs) != len(prompt_token_ids):
        raise RuntimeError(f"vLLM returned {len(request_outputs)} results for {len(prompt_token_ids)} prompts.")
    completions = []
    for index, request in enumerate(request_outputs):
        outputs = sorted(request.outputs, key=lambda output: output.index)
        if len(outputs) != n:
            raise RuntimeError(f"vLLM returned {len(outputs)} completions for prompt {index}, expected n={n}.")
        completions.extend(outputs)

    width = max(1, max(len(output.token_ids) for output in completions))
    num_rows = len(completions)
    completion_ids = torch.full((num_rows, width), pad_id, dtype=torch.long)
    sampling_logprobs = torch.zeros((num_rows, width), dtype=torch.float32)
    lengths = torch.zeros(num_rows, dtype=torch.long)
    texts, reasons = [], []
    for row, output in enumerate(completions):
        ids = list(output.token_ids)
        lengths[row] = len(ids)
        if ids:
            completion_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            sampling_logprobs[row, : len(ids)] = torch.tensor(sampled_logprobs(ids, output.logprobs))
        texts.append(cut_at_stop(output.text, stop_strings))
        reasons.append(finish_reason(output.finish_reason, getattr(output, "stop_reason", None)))
    completion_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()

    prompt_width = max(len(ids) for ids in prompt_token_ids)
    prompt_ids = torch.full((len(prompt_token_ids), prompt_width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(prompt_token_ids), prompt_width), dtype=torch.long)
    for row, ids in enumerate(prompt_token_ids):
        prompt_ids[row, prompt_width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        prompt_mask[row, prompt_width - len(ids):] = 1
    row_prompt = torch.arange(len(prompt_token_ids)).repeat_interleave(n)
    return RolloutOutput(
        prompt_ids=prompt_ids[row_prompt].to(device), prompt_mask=prompt_mask[row_prompt].to(device),
        completion_ids=completion_ids.to(device), completion_mask=completion_mask.to(device),
        sampling_logprobs=sampling_logprobs.to(device), completion_texts=texts, finish_reasons=reasons,
        prompt_index=row_prompt.to(device), generate_seconds=generate_seconds,
        num_generated_tokens=int(lengths.sum()),
    )


def _runner_model(llm):
    """The in-process nn.Module vLLM runs, or None when the worker lives in another process."""
    engine = llm.llm_engine
    candidates = (
        ("model_executor", "driver_worker", "model_runner", "model"),  # TRL's colocate path
        ("model_executor", "driver_worker", "worker", "model_runner", "model"),
        ("engine_core", "engine_core", "model_executor", "driver_worker", "worker", "model_runner", "model"),
    )
    for path in candidates:
        target = engine
        for name in path:
            target = getattr(target, name, None)
            if target is None:
                break
        if target is not None and hasattr(target, "load_weights"):
            return target
    return None


def _load_weights_on_worker(worker, weights):
    """Run inside a vLLM worker by LLM.collective_rpc."""
    worker.model_runner.model.load_weights(weights)


class VLLMRolloutEngine:
    """Sample with vLLM from a model directory; keep it in step with the trainer's policy by `sync_weights`.

    `gpu_memory_utilization` is the share of GPU memory vLLM takes for weights and KV cache; the rest is
    left for the trainer's model, optimizer and activations on the same GPU. `device` is where the returned
    tensors go (default: cuda when available). Extra keyword arguments go to `vllm.LLM` unchanged.
    """

    def __init__(self, model_path: str | os.PathLike, tokenizer, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.3, max_model_len: int | None = None, seed: int = 0,
                 enable_prefix_caching: bool = True, device: str | torch.device | None = None, **llm_kwargs):
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must lie in (0, 1], got {gpu_memory_utilization}; "
                             "e.g. 0.3 leaves 70% of the GPU to the trainer.")
        vllm = import_vllm()
        self._vllm = vllm
        # Where the trainer wants the batch tensors (the HF engine returns them on the model's device).
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise ValueError("tokenizer has neither pad_token_id nor eos_token_id; set tokenizer.pad_token.")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # keep the worker in this process
        try:
            self.llm = vllm.LLM(model=os.fspath(model_path), tokenizer=os.fspath(model_path), dtype=dtype,
                                gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                                seed=seed, enable_prefix_caching=enable_prefix_caching,
                                logprobs_mode="processed_logprobs", **llm_kwargs)
        except TypeError as error:
            if "logprobs_mode" not in str(error):
                raise
            raise VLLMNotInstalledError(
                f"this vllm ({getattr(vllm, '__version__', '?')}) has no logprobs_mode, so it would report the "
                f"log-probs of the T = 1 distribution instead of the sampled one. Fix: pip install "
                "'vllm>=0.10.2'.") from error
        # The same end-of-sequence ids as the HF engine: the tokenizer's eos plus the generation config's.
        try:
            from transformers import GenerationConfig

            generation_eos = GenerationConfig.from_pretrained(os.fspath(model_path)).eos_token_id
        except OSError:  # no generation_config.json
            generation_eos = None
        eos = {tokenizer.eos_token_id}
        eos.update(generation_eos if isinstance(generation_eos, (list, tuple)) else [generation_eos])
        eos.discard(None)
        self.eos_ids = sorted(eos)
        self._warned_truncation = False

    def sampling_params(self, params: SamplingParams, seed: int | None):
        """zerorl's SamplingParams → vllm.SamplingParams (n samples, stop strings kept, sampled log-prob)."""
        return self._vllm.SamplingParams(
            n=params.n,
            temperature=0.0 if params.is_greedy else params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,  # 0 = off, as in zerorl
            max_tokens=params.max_new_tokens,
            stop=list(params.stop_strings),
            include_stop_str_in_output=True,  # the HF engine keeps the stop string too
            stop_token_ids=self.eos_ids,
            logprobs=0,  # the sampled token's log-prob only
            seed=seed,
            skip_special_tokens=True,
        )

    def generate(self, prompts: list[str], params: SamplingParams, seed: int | None = None) -> RolloutOutput:
        if isinstance(prompts, str) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings.")
        if (params.top_k > 0 or params.top_p < 1.0) and not params.is_greedy and not self._warned_truncation:
            warnings.warn("top_k/top_p are active: vLLM's sampling log-probs are renormalised over the kept "
                          "tokens and differ from zerorl's convention (and the HF engine's) by log(mass kept).",
                          stacklevel=2)
            self._warned_truncation = True
        start = time.perf_counter()
        prompt_token_ids = self.tokenizer(list(prompts))["input_ids"]
        for index, ids in enumerate(prompt_token_ids):
            if len(ids) == 0:
                raise ValueError(f"prompt {index} ({prompts[index]!r}) tokenizes to zero tokens; every prompt "
                                 "needs at least one token.")
        # One request per prompt, each with its own seed: n samples of a request are still independent.
        requests = [{"prompt_token_ids": ids} for ids in prompt_token_ids]
        sampling = [self.sampling_params(params, None if seed is None else seed + index)
                    for index in range(len(requests))]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        return rollout_from_vllm(outputs, prompt_token_ids, params.n, self.pad_id, params.stop_strings,
                                 time.perf_counter() - start, device=self.device)

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy `model`'s current weights into vLLM (call after each optimizer step), then drop cached KV."""
        prefix = "_orig_mod."  # torch.compile wraps the module; vLLM knows the plain names
        weights = [(name.removeprefix(prefix), tensor.detach()) for name, tensor in model.state_dict().items()]
        runner_model = _runner_model(self.llm)
        if runner_model is not None:
            runner_model.load_weights(weights)
        else:  # the worker runs in another process: ship the tensors (slower, but correct)
            self.llm.collective_rpc(_load_weights_on_worker, args=([(n, t.cpu()) for n, t in weights],))
        self.llm.reset_prefix_cache()


__all__ = ["INSTALL_HINT", "VLLMNotInstalledError", "VLLMRolloutEngine", "finish_reason", "import_vllm",
           "rollout_from_vllm", "sampled_logprobs"]
