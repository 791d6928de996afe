"""The vLLM engine without vLLM: the missing-package message, and the conversion of vLLM's outputs into
zerorl's RolloutOutput conventions (checked on stand-ins shaped like vLLM's RequestOutput)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from zerorl.lm import vllm_engine
from zerorl.lm.rollout import RolloutEngine, SamplingParams
from zerorl.lm.vllm_engine import (
    VLLMNotInstalledError,
    VLLMRolloutEngine,
    finish_reason,
    import_vllm,
    rollout_from_vllm,
)


class FakeTokenizer:
    pad_token_id, eos_token_id = 0, 1

    def __call__(self, texts):
        return {"input_ids": [[2 + (ord(c) % 50) for c in text] for text in texts]}


def completion(index, ids, logps, text, reason, stop_reason=None):
    logprobs = [{token: SimpleNamespace(logprob=lp)} for token, lp in zip(ids, logps)]
    return SimpleNamespace(index=index, token_ids=ids, logprobs=logprobs, text=text, finish_reason=reason,
                           stop_reason=stop_reason)


def test_missing_vllm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(VLLMNotInstalledError, match=r"pip install 'zerorl\[vllm\]'"):
        import_vllm()
    with pytest.raises(ImportError, match="HFRolloutEngine"):
        VLLMRolloutEngine("some/model", FakeTokenizer())


def test_finish_reasons():
    assert finish_reason("length", None) == "length"
    assert finish_reason("stop", None) == "eos"  # the model's EOS
    assert finish_reason("stop", 7) == "eos"  # one of stop_token_ids
    assert finish_reason("stop", "</answer>") == "stop"
    with pytest.raises(RuntimeError, match="'abort'"):
        finish_reason("abort", None)


def test_outputs_become_prompt_major_padded_rows():
    # Two prompts (3 and 1 tokens) × n = 2. vLLM may list a request's completions out of index order.
    requests = [
        SimpleNamespace(outputs=[
            completion(1, [5, 1], [-0.5, -0.25], "b", "stop"),  # ended by EOS (id 1)
            completion(0, [4, 6, 7], [-1.0, -2.0, -3.0], "x</answer>tail", "stop", "</answer>"),
        ]),
        SimpleNamespace(outputs=[
            completion(0, [8, 9, 8, 9], [-0.1, -0.2, -0.3, -0.4], "abcd", "length"),
            completion(1, [3], [-0.75], "c", "stop"),
        ]),
    ]
    out = rollout_from_vllm(requests, [[11, 12, 13], [14]], n=2, pad_id=0, stop_strings=("</answer>",),
                            generate_seconds=2.0)
    assert out.prompt_index.tolist() == [0, 0, 1, 1]
    assert out.prompt_ids.tolist() == [[11, 12, 13]] * 2 + [[0, 0, 14]] * 2  # left-padded
    assert out.prompt_mask.tolist() == [[1, 1, 1]] * 2 + [[0, 0, 1]] * 2
    assert out.completion_ids.tolist() == [[4, 6, 7, 0], [5, 1, 0, 0], [8, 9, 8, 9], [3, 0, 0, 0]]
    assert out.completion_mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert torch.equal(out.sampling_logprobs, torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-0.5, -0.25, 0.0, 0.0],
                                                            [-0.1, -0.2, -0.3, -0.4], [-0.75, 0.0, 0.0, 0.0]]))
    assert out.sampling_logprobs.dtype == torch.float32
    assert out.finish_reasons == ["stop", "eos", "length", "eos"]
    assert out.completion_texts == ["x</answer>", "b", "abcd", "c"]  # cut right after the stop string
    assert out.num_generated_tokens == 10
    assert out.tokens_per_second == pytest.approx(5.0)


def test_wrong_number_of_completions_is_an_error():
    requests = [SimpleNamespace(outputs=[completion(0, [4], [-1.0], "a", "length")])]
    with pytest.raises(RuntimeError, match="1 completions for prompt 0, expected n=2"):
        rollout_from_vllm(requests, [[3]], n=2, pad_id=0, stop_strings=(), generate_seconds=1.0)


def test_engine_with_a_stand_in_vllm(monkeypatch, tmp_path):
    """The engine's calls into vLLM: requests as token ids, a seed per prompt, sync through load_weights."""
    calls = {}

    class FakeRunnerModel:
        def load_weights(self, weights):
            calls["weights"] = [name for name, _ in weights]

    class FakeLLM:
        def __init__(self, **kwargs):
            calls["llm_kwargs"] = kwargs
            self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(
                driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=FakeRunnerModel()))))

        def generate(self, requests, sampling, use_tqdm=False):
            calls["requests"], calls["sampling"] = requests, sampling
            return [SimpleNamespace(outputs=[completion(i, [4, 1], [-1.0, -1.0], "a", "stop")
                                             for i in range(s["n"])]) for s in sampling]

        def reset_prefix_cache(self):
            calls["reset"] = True

    fake = SimpleNamespace(LLM=FakeLLM, SamplingParams=lambda **kwargs: kwargs, __version__="fake")
    monkeypatch.setitem(sys.modules, "vllm", fake)
    engine = VLLMRolloutEngine(tmp_path, FakeTokenizer(), device="cpu")
    assert isinstance(engine, RolloutEngine)
    assert calls["llm_kwargs"]["logprobs_mode"] == "processed_logprobs"
    out = engine.generate(["ab", "c"], SamplingParams(n=3, max_new_tokens=5, temperature=0.7), seed=10)
    assert calls["requests"] == [{"prompt_token_ids": [2 + 97 % 50, 2 + 98 % 50]}, {"prompt_token_ids": [2 + 99 % 50]}]
    assert [s["seed"] for s in calls["sampling"]] == [10, 11]
    first = calls["sampling"][0]
    assert (first["n"], first["temperature"], first["max_tokens"], first["logprobs"]) == (3, 0.7, 5, 0)
    assert first["stop"] == ["</answer>"] and first["include_stop_str_in_output"] is True
    assert first["stop_token_ids"] == [1]
    assert out.completion_ids.shape == (6, 2) and out.finish_reasons == ["eos"] * 6

    with pytest.warns(UserWarning, match="renormalised"):
        engine.generate(["ab"], SamplingParams(n=1, top_p=0.9), seed=0)

    model = torch.nn.Linear(2, 2)
    engine.sync_weights(model)
    assert calls["weights"] == ["weight", "bias"] and calls["reset"] is True


def test_module_does_not_import_vllm_at_import_time():
    assert "vllm" not in vllm_engine.__dict__


@pytest.mark.parametrize("bf16, dtype, expected", [(True, "float32", "bfloat16"), (False, "float32", "float32"),
                                                   (False, "bfloat16", "bfloat16")])
def test_trainer_starts_vllm_in_the_precision_it_trains_in(monkeypatch, bf16, dtype, expected):
    """bf16=true (autocast over float32 weights) samples in bf16 with vLLM as with the in-process engine,
    not in float32 at several times the cost; otherwise vLLM gets the run's dtype."""
    from zerorl.config import TrainConfig
    from zerorl.lm.runtime import build_engine

    seen = {}

    def stand_in(model_path, tokenizer, dtype="auto", **kwargs):
        seen.update(dtype=dtype, **kwargs)
        return "engine"

    monkeypatch.setattr(vllm_engine, "VLLMRolloutEngine", stand_in)
    config = TrainConfig(use_vllm=True, bf16=bf16, dtype=dtype)
    assert build_engine(config, None, FakeTokenizer(), "some/model") == "engine"
    assert seen["dtype"] == expected and seen["gpu_memory_utilization"] == config.vllm_gpu_memory_utilization
