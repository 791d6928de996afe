"""zerorl.lm.rollout: the HF rollout engine against fresh forward passes and model.generate."""

import math

import pytest
import torch

from zerorl.core.logprobs import logprobs_from_logits
from zerorl.lm.models import build_tiny_model, load_model_and_tokenizer
from zerorl.lm.rollout import (
    HFRolloutEngine,
    RolloutEngine,
    SamplingParams,
    can_complete,
    cut_at_stop,
    inverse_cdf_sample,
    prompt_stream,
    sample_next_token,
    sampling_uniforms,
)

SMALL = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=256)
PROMPTS = ["What is 7+8?", "Hi", "Using the numbers [3, 5, 9], make 17. Think first.", "x"]


@pytest.fixture(scope="module", params=[("qwen2", "char"), ("llama", "bpe")], ids=["qwen2-char", "llama-bpe"])
def engine(request, tmp_path_factory):
    arch, tok = request.param
    path = build_tiny_model(tmp_path_factory.mktemp(arch) / "m", arch=arch, tokenizer=tok, seed=1, **SMALL)
    model, tokenizer = load_model_and_tokenizer(path, native=False)  # transformers generate() is the reference
    return HFRolloutEngine(model, tokenizer)


def _fresh_logprobs(model, out, temperature):
    """Score prompt+completion in one padded forward pass, the way a trainer does."""
    ids = torch.cat([out.prompt_ids, out.completion_ids], dim=1)
    mask = torch.cat([out.prompt_mask, out.completion_mask], dim=1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    prompt_len = out.prompt_ids.shape[1]
    return logprobs_from_logits(logits[:, prompt_len - 1 : -1], out.completion_ids, temperature=temperature)


def test_sampling_logprobs_match_a_fresh_forward_pass(engine):
    # Guards the KV-cache expansion, row dropping and decode-position bookkeeping. (A constant
    # per-row position shift would pass: rotary attention only sees relative positions.)
    params = SamplingParams(max_new_tokens=24, temperature=0.7, top_p=0.9, top_k=40, n=3, stop_strings=())
    out = engine.generate(PROMPTS, params, seed=0)
    mask = out.completion_mask.bool()
    assert out.sampling_logprobs.dtype == torch.float32
    assert torch.all(out.sampling_logprobs[~mask] == 0) and torch.all(out.sampling_logprobs[mask] < 0)
    padded = _fresh_logprobs(engine.model, out, temperature=0.7)
    assert (padded - out.sampling_logprobs)[mask].abs().max() < 1e-4
    # and each row alone, without any padding, gives the same numbers
    for row in range(len(out.completion_texts)):
        prompt = out.prompt_ids[row][out.prompt_mask[row].bool()]
        completion = out.completion_ids[row][mask[row]]
        ids = torch.cat([prompt, completion])[None]
        with torch.no_grad():
            logits = engine.model(input_ids=ids).logits
        alone = logprobs_from_logits(logits[:, len(prompt) - 1 : -1], completion[None], temperature=0.7)[0]
        assert (alone - out.sampling_logprobs[row][mask[row]]).abs().max() < 1e-4


def test_output_layout_is_prompt_major_and_padded(engine):
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, n=3, stop_strings=()), seed=3)
    rows = len(PROMPTS) * 3
    assert out.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert out.prompt_ids.shape[0] == out.completion_ids.shape[0] == rows == len(out.completion_texts)
    tokenizer = engine.tokenizer
    for row in range(rows):
        real = out.prompt_ids[row][out.prompt_mask[row].bool()].tolist()
        assert real == tokenizer(PROMPTS[row // 3])["input_ids"]
        assert out.prompt_mask[row].tolist() == sorted(out.prompt_mask[row].tolist())  # left padding
        length = int(out.completion_mask[row].sum())
        assert out.completion_mask[row].tolist() == [1] * length + [0] * (out.completion_ids.shape[1] - length)
        assert torch.all(out.completion_ids[row, length:] == tokenizer.pad_token_id)
    assert out.num_generated_tokens == int(out.completion_mask.sum())
    assert not out.completion_ids.is_inference() and not out.sampling_logprobs.is_inference()


def test_same_seed_same_samples_different_seed_different(engine):
    params = SamplingParams(max_new_tokens=16, n=2, stop_strings=())
    first, again = engine.generate(PROMPTS, params, seed=7), engine.generate(PROMPTS, params, seed=7)
    other = engine.generate(PROMPTS, params, seed=8)
    assert torch.equal(first.completion_ids, again.completion_ids)
    assert torch.equal(first.sampling_logprobs, again.sampling_logprobs)
    assert not torch.equal(first.completion_ids, other.completion_ids)
    # the n samples of one prompt differ from each other (sampling, not copies)
    assert not torch.equal(first.completion_ids[0], first.completion_ids[1])


def test_greedy_equals_transformers_generate(engine):
    model, tokenizer = engine.model, engine.tokenizer
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=20, temperature=0.0, stop_strings=()))
    encoded = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    reference = model.generate(**encoded, do_sample=False, max_new_tokens=20)[:, encoded["input_ids"].shape[1]:]
    for row in range(len(PROMPTS)):
        length = int(out.completion_mask[row].sum())
        assert out.completion_ids[row, :length].tolist() == reference[row, :length].tolist()
        if out.finish_reasons[row] == "length":
            assert length == 20
        else:  # generate pads after the EOS it also stopped at
            assert out.finish_reasons[row] == "eos" and out.completion_ids[row, length - 1] in engine.eos_ids
    # top_k=1 sampling is greedy too, and its log-probs are those of the T=1 distribution
    top1 = engine.generate(PROMPTS, SamplingParams(max_new_tokens=20, top_k=1, stop_strings=()), seed=5)
    assert torch.equal(top1.completion_ids, out.completion_ids)
    assert torch.allclose(top1.sampling_logprobs, out.sampling_logprobs, atol=1e-6)


def test_stop_string_cuts_text_and_mask(engine):
    greedy = SamplingParams(max_new_tokens=30, temperature=0.0, stop_strings=())
    full = engine.generate(PROMPTS[:1], greedy).completion_texts[0]
    assert len(full) >= 8
    stop = full[4:6]  # a stop string the greedy continuation is known to contain
    expected_text = full[: full.find(stop) + len(stop)]
    out = engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=30, temperature=0.0, stop_strings=("@@", stop)))
    assert out.finish_reasons == ["stop"]
    assert out.completion_texts == [expected_text]
    # the mask covers exactly the tokens up to the one that completed the stop string
    kept = out.completion_ids[0][out.completion_mask[0].bool()].tolist()
    decoded = engine.tokenizer.decode(kept)
    assert decoded.startswith(expected_text) and not engine.tokenizer.decode(kept[:-1]).endswith(stop)
    assert stop not in engine.tokenizer.decode(kept[:-1])
    if len(engine.tokenizer) < 128:  # char tokenizer: one token per character
        assert len(kept) == len(expected_text)


def test_only_tokens_that_can_end_a_stop_string_are_checked(tmp_path):
    # The stop string must end inside the new token: it lies within the token, or the token starts with a
    # proper suffix of it (the rest already ends the text).
    assert can_complete("</answer>", "</answer>") and can_complete("x</answer>y", "</answer>")
    assert can_complete(">", "</answer>") and can_complete("er>\n", "</answer>") and can_complete("/answer>", "</answer>")
    assert not can_complete("<|filler_7|>", "</answer>")  # holds the last character, ends nothing
    assert not can_complete("</", "</answer>") and not can_complete("answer", "</answer>")
    # A vocabulary padded with filler tokens (every one holds '>'): none of them is decoded at each step,
    # the tokens that can end "</answer>" are, and tokens with an empty lone decode stay candidates.
    path = build_tiny_model(tmp_path / "m", arch="qwen2", tokenizer="bpe", seed=0, pad_vocab_to=1500, **SMALL)
    model, tokenizer = load_model_and_tokenizer(path)
    table = HFRolloutEngine(model, tokenizer)._stop_candidate_table(("</answer>",), len(tokenizer), "cpu")
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
    fillers = [i for i, text in enumerate(texts) if text.startswith("<|filler_")]
    assert len(fillers) > 500 and not table[fillers].any()
    for i, text in enumerate(texts):
        expected = (not text) or "\ufffd" in text or can_complete(text, "</answer>")
        assert bool(table[i]) == expected, (i, text)
    assert table[[i for i, text in enumerate(texts) if text.endswith(">") and not text.startswith("<|")]].all()


def test_max_new_tokens_and_eos_finish_reasons(engine):
    # hot sampling over many rows makes some completions hit EOS by chance (seeded, so deterministic)
    params = SamplingParams(max_new_tokens=6, temperature=3.0, n=48, stop_strings=())
    out = engine.generate(PROMPTS[:2], params, seed=11)
    lengths = out.completion_mask.sum(1)
    assert out.completion_ids.shape[1] <= 6
    assert set(out.finish_reasons) == {"eos", "length"}
    for row, reason in enumerate(out.finish_reasons):
        if reason == "length":
            assert lengths[row] == 6
        else:
            assert int(out.completion_ids[row, lengths[row] - 1]) in engine.eos_ids
            assert not any(int(t) in engine.eos_ids for t in out.completion_ids[row, : lengths[row] - 1])


def test_max_batch_size_splits_without_changing_greedy_results(engine):
    params = SamplingParams(max_new_tokens=10, temperature=0.0, n=3, stop_strings=())
    whole = engine.generate(PROMPTS, params)
    split = HFRolloutEngine(engine.model, engine.tokenizer, max_batch_size=2).generate(PROMPTS, params)
    assert split.prompt_index.tolist() == whole.prompt_index.tolist()
    assert torch.equal(split.completion_ids, whole.completion_ids)
    assert torch.allclose(split.sampling_logprobs, whole.sampling_logprobs, atol=1e-5)


def test_train_mode_is_restored_and_protocol_holds(engine):
    engine.model.train()
    engine.generate(["Hi"], SamplingParams(max_new_tokens=2, stop_strings=()), seed=0)
    assert engine.model.training
    engine.model.eval()
    assert isinstance(engine, RolloutEngine)
    engine.sync_weights(engine.model)  # no-op rebind for the live-policy engine


def test_top_p_and_top_k_truncate_but_logprobs_are_untruncated():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4).contiguous()
    generator = torch.Generator().manual_seed(0)
    for params in [SamplingParams(top_p=0.7), SamplingParams(top_k=2)]:
        tokens, logprobs = sample_next_token(logits, params, torch.rand(4000, generator=generator))
        counts = torch.bincount(tokens, minlength=4)
        assert counts[2] == counts[3] == 0  # {0, 1} is the nucleus / the top 2
        assert abs(counts[0] / 4000 - 0.5 / 0.8) < 0.03  # renormalised within the kept set
        assert torch.allclose(logprobs, probs.log()[tokens], atol=1e-6)  # but reported unrenormalised
    tokens, logprobs = sample_next_token(logits[:1] * 2, SamplingParams(temperature=2.0), torch.rand(1))
    assert math.isclose(float(logprobs[0]), math.log(float(probs[tokens[0]])), abs_tol=1e-5)


def test_inverse_cdf_sample_draws_each_token_with_its_probability():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3, 0.0]])
    # Hand-computed: F = [0.1, 0.1, 0.7, 1.0, 1.0]; token = first k with F_k > u.
    for u, expected in [(0.0, 0), (0.0999, 0), (0.1001, 2), (0.6999, 2), (0.7001, 3), (0.99999, 3)]:
        assert int(inverse_cdf_sample(probs, torch.tensor([u]))[0]) == expected, u
    # u · F_V rounded up onto F_V: the last token with positive probability, never a zero-probability one.
    assert int(inverse_cdf_sample(probs, torch.tensor([1.0]))[0]) == 3
    # Unnormalised rows are normalised by F_V; 200k draws match the probabilities (4σ ≈ 0.0044).
    many = torch.tensor([[2.0, 0.0, 12.0, 6.0, 0.0]]).expand(200_000, 5)
    tokens = inverse_cdf_sample(many, torch.rand(200_000, generator=torch.Generator().manual_seed(0)))
    frequencies = torch.bincount(tokens, minlength=5) / 200_000
    assert frequencies[1] == frequencies[4] == 0
    assert torch.allclose(frequencies, probs[0], atol=0.0045)
    # NaN logits (an overflowed model) are refused with a message, not turned into an arbitrary token.
    broken = torch.tensor([[0.0, 1.0], [float("nan"), 1.0]])
    with pytest.raises(ValueError, match=r"rows \[1\] are not finite"):
        sample_next_token(broken, SamplingParams(temperature=1.0), torch.rand(2))


def test_sampling_uniforms_depend_on_seed_prompt_and_sample_only():
    rows = torch.arange(12)  # 4 prompts × n = 3
    whole = sampling_uniforms(5, rows, 3, 7)
    assert whole.shape == (12, 7) and 0 <= float(whole.min()) and float(whole.max()) < 1
    # Any subset of rows, however split, reads the same numbers.
    for part in (torch.tensor([4, 5, 6, 7]), torch.tensor([2]), torch.tensor([9, 10, 11])):
        assert torch.equal(sampling_uniforms(5, part, 3, 7), whole[part])
    assert not torch.equal(sampling_uniforms(6, rows, 3, 7), whole)
    assert len({tuple(row.tolist()) for row in whole}) == 12  # independent streams per prompt and sample
    assert torch.equal(whole[3:6], torch.rand(3, 7, generator=prompt_stream(5, 1)))  # prompt 1's block


def test_sampling_params_validation_and_cut_at_stop():
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="tuple of strings"):
        SamplingParams(stop_strings="</answer>")
    with pytest.raises(ValueError, match="n \\(samples per prompt\\)"):
        SamplingParams(n=0)
    assert SamplingParams(temperature=0).is_greedy and SamplingParams(temperature=0).logprob_temperature == 1.0
    assert cut_at_stop("a</answer>b</answer>", ("</answer>",)) == "a</answer>"
    assert cut_at_stop("xx STOP yy END", ("END", "STOP")) == "xx STOP"
    assert cut_at_stop("no stop", ("</answer>",)) == "no stop"


def test_empty_prompt_is_rejected(engine):
    with pytest.raises(ValueError, match="prompt 1 .* zero tokens"):
        engine.generate(["ok", ""], SamplingParams(max_new_tokens=2))
