"""zerorl.lm.native computes the transformers forward's function, faster: logits, gradients, decoding and
the GRPO loss on a fixed batch must match the plain implementation (issue 7: "same math", 1e-5)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from zerorl.config import TrainConfig
from zerorl.lm import decode_step
from zerorl.lm.batch import RolloutBatch
from zerorl.lm.forward import completion_logits
from zerorl.lm.grpo import grpo_loss
from zerorl.lm.lora import apply_lora
from zerorl.lm.models import build_tiny_model, load_model_and_tokenizer
from zerorl.lm.native import NativeDecoder, SwiGLUDown, _silu_grad, unsupported_reason
from zerorl.lm.rollout import HFRolloutEngine, SamplingParams


def _qwen3(tmp_path):
    """Qwen3 adds per-head RMSNorm on q and k; its config has no char-tokenizer builder, so take the
    qwen2 directory's tokenizer and a random Qwen3 body."""
    config = Qwen3Config(vocab_size=99, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@pytest.fixture(scope="module", params=["qwen2", "llama", "qwen3"])
def model_and_tokenizer(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    arch = "qwen2" if request.param == "qwen3" else request.param
    directory = build_tiny_model(tmp / "m", arch=arch, tokenizer="bpe" if arch == "llama" else "char",
                                 hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    model, tokenizer = load_model_and_tokenizer(str(directory), native=False)  # the transformers model
    if request.param == "qwen3":
        model = _qwen3(tmp)
    return model.eval(), tokenizer


def _random_batch(vocab: int, seed: int = 0):
    """3 prompts of different lengths (left-padded) × 2 completions of lengths 9, 3, 1, 6, 9, 2."""
    gen = torch.Generator().manual_seed(seed)
    prompt_lengths, completion_lengths = [7, 4, 5], [9, 3, 1, 6, 9, 2]
    prompt_ids = torch.randint(1, vocab, (3, 7), generator=gen)
    prompt_mask = torch.zeros(3, 7, dtype=torch.long)
    for row, length in enumerate(prompt_lengths):
        prompt_mask[row, 7 - length:] = 1
    rows = torch.arange(3).repeat_interleave(2)
    completion_ids = torch.randint(1, vocab, (6, 9), generator=gen)
    completion_mask = torch.zeros(6, 9, dtype=torch.long)
    for row, length in enumerate(completion_lengths):
        completion_mask[row, :length] = 1
    return (prompt_ids * prompt_mask)[rows], prompt_mask[rows], completion_ids * completion_mask, completion_mask


def test_logits_and_gradients_equal_the_transformers_forward(model_and_tokenizer):
    model, _ = model_and_tokenizer
    assert unsupported_reason(model) is None
    batch = _random_batch(model.config.vocab_size)
    mask = batch[3][..., None].bool()
    plain = completion_logits(model, *batch)
    native = completion_logits(model, *batch, native=NativeDecoder(model))
    assert native.shape == plain.shape
    assert torch.allclose(native.masked_fill(~mask, 0), plain.masked_fill(~mask, 0), atol=1e-5, rtol=0)

    weights = torch.randn(plain.shape, generator=torch.Generator().manual_seed(1)) * mask
    model.zero_grad()
    (plain * weights).sum().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    (completion_logits(model, *batch, native=NativeDecoder(model)) * weights).sum().backward()
    for name, p in model.named_parameters():
        scale = expected[name].abs().max().clamp(min=1.0)
        assert (p.grad - expected[name]).abs().max() / scale < 1e-5, name
    model.zero_grad()


def test_a_prompt_shared_by_its_group_gives_each_row_the_logits_it_would_get_alone(model_and_tokenizer):
    model, _ = model_and_tokenizer
    native = NativeDecoder(model)
    prompt_ids, prompt_mask, completion_ids, completion_mask = _random_batch(model.config.vocab_size, seed=3)
    together = native.completion_logits(prompt_ids, prompt_mask, completion_ids, completion_mask)
    for row in (0, 3, 5):
        alone = native.completion_logits(prompt_ids[row:row + 1], prompt_mask[row:row + 1],
                                         completion_ids[row:row + 1], completion_mask[row:row + 1])
        width = int(completion_mask[row].sum())
        assert torch.allclose(together[row, :width], alone[0, :width], atol=1e-5, rtol=0)


def test_completions_one_token_wide_are_predicted_from_the_prompts_alone(model_and_tokenizer):
    """Lc = 1: the joint pass has no completion inputs, only the prompts' last positions."""
    model, _ = model_and_tokenizer
    prompt_ids, prompt_mask, completion_ids, completion_mask = _random_batch(model.config.vocab_size, seed=5)
    narrow = (prompt_ids, prompt_mask, completion_ids[:, :1], completion_mask[:, :1])
    plain = completion_logits(model, *narrow)
    native = completion_logits(model, *narrow, native=NativeDecoder(model))
    assert native.shape == plain.shape == (6, 1, model.config.vocab_size)
    assert torch.allclose(native, plain, atol=1e-5, rtol=0)


def _rollout(model, tokenizer, seed=4):
    prompts = ["12+34=", "7-5=", "100+1=?"]
    engine = HFRolloutEngine(model, tokenizer, native=True)
    return engine, engine.generate(prompts, SamplingParams(max_new_tokens=9, n=3, stop_strings=()), seed=seed)


def test_scripted_decode_layers_give_the_eager_loop_s_tokens_and_logprobs_bit_for_bit(model_and_tokenizer,
                                                                                        monkeypatch):
    """TorchScript runs the same float32 ops as the eager decode loop (zerorl.lm.decode_step): a whole rollout
    samples the same tokens with the same log-probs. Qwen3's q/k norms keep it on the eager loop."""
    model, tokenizer = model_and_tokenizer
    engine, scripted = _rollout(model, tokenizer)
    uses_script = engine.native.scripted_decode_layers(engine.native.decode_weights()) is not None
    assert uses_script == (not hasattr(model.model.layers[0].self_attn, "q_norm"))
    monkeypatch.setattr(NativeDecoder, "scripted_decode_layers", lambda self, *args, **kwargs: None)
    _, eager = _rollout(model, tokenizer)
    assert torch.equal(scripted.completion_ids, eager.completion_ids)
    assert torch.equal(scripted.sampling_logprobs, eager.sampling_logprobs)
    assert scripted.finish_reasons == eager.finish_reasons


def test_scripted_decode_layers_with_output_projection_biases(tmp_path, monkeypatch):
    """Llama with attention_bias: q/k/v and o carry biases (the fixtures' Qwen2 has q/k/v biases only)."""
    directory = build_tiny_model(tmp_path / "m", arch="llama", tokenizer="bpe", hidden_size=64, num_layers=2,
                                 num_heads=4, num_kv_heads=2)
    _, tokenizer = load_model_and_tokenizer(str(directory), native=False)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                         max_position_embeddings=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    for layer in model.model.layers:
        torch.nn.init.normal_(layer.self_attn.o_proj.bias, std=0.1)
    engine, scripted = _rollout(model, tokenizer, seed=2)
    assert engine.native.scripted_decode_layers(engine.native.decode_weights()) is not None
    monkeypatch.setattr(NativeDecoder, "scripted_decode_layers", lambda self, *args, **kwargs: None)
    _, eager = _rollout(model, tokenizer, seed=2)
    assert torch.equal(scripted.completion_ids, eager.completion_ids)
    assert torch.equal(scripted.sampling_logprobs, eager.sampling_logprobs)


def test_scripted_decode_layers_under_bf16_autocast_give_the_eager_loop_s_tokens_and_logprobs(model_and_tokenizer,
                                                                                                monkeypatch):
    """Autocast casts where an op is dispatched, whether Python or TorchScript calls it: the same numbers."""
    model, tokenizer = model_and_tokenizer
    prompts, params = ["12+34=", "7-5=", "100+1=?"], SamplingParams(max_new_tokens=9, n=3, stop_strings=())
    engine = HFRolloutEngine(model, tokenizer, autocast_dtype=torch.bfloat16)
    scripted = engine.generate(prompts, params, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        uses_script = engine.native.scripted_decode_layers(engine.native.decode_weights("cpu"), "cpu") is not None
    assert uses_script == (not hasattr(model.model.layers[0].self_attn, "q_norm"))
    monkeypatch.setattr(NativeDecoder, "scripted_decode_layers", lambda self, *args, **kwargs: None)
    eager = HFRolloutEngine(model, tokenizer, autocast_dtype=torch.bfloat16).generate(prompts, params, seed=5)
    assert torch.equal(scripted.completion_ids, eager.completion_ids)
    assert torch.equal(scripted.sampling_logprobs, eager.sampling_logprobs)


def test_decoding_falls_back_to_the_eager_loop_where_torchscript_fails(model_and_tokenizer, monkeypatch):
    from zerorl.lm import decode_step

    model, tokenizer = model_and_tokenizer
    _, expected = _rollout(model, tokenizer, seed=6)

    def unavailable(fn):
        raise RuntimeError("no TorchScript in this build")

    monkeypatch.setattr(decode_step, "_SCRIPTED", [])  # compile again, with torch.jit.script failing
    monkeypatch.setattr(torch.jit, "script", unavailable)
    engine, fallback = _rollout(model, tokenizer, seed=6)
    assert engine.native.scripted_decode_layers(engine.native.decode_weights()) is None
    assert torch.equal(fallback.completion_ids, expected.completion_ids)
    assert torch.equal(fallback.sampling_logprobs, expected.sampling_logprobs)


def test_the_scripted_layers_are_not_used_with_module_calls_or_weights_of_another_dtype(model_and_tokenizer):
    model, _ = model_and_tokenizer
    native = NativeDecoder(model)
    if native.qk_norm:
        pytest.skip("q/k norms: never scripted")
    assert native.scripted_decode_layers(native.decode_weights()) is not None
    float32_weights = native.decode_weights("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert native.scripted_decode_layers(native.decode_weights("cpu"), "cpu") is not None
        assert native.scripted_decode_layers(float32_weights, "cpu") is None  # not what autocast decodes with
    weights = native.decode_weights("cpu")
    weights.layers[0] = (None, *weights.layers[0][1:])  # a LoRA-wrapped q/k/v: called as modules
    assert native.scripted_decode_layers(weights) is None
    weights = native.decode_weights("cpu")
    qkv, (o_weight, _, o_packed), gate_up, down = weights.layers[0]
    weights.layers[0] = (qkv, (o_weight, torch.zeros(o_weight.shape[0]), o_packed), gate_up, down)  # one layer's bias
    assert native.scripted_decode_layers(weights) is None
    if o_packed is not None:
        weights = native.decode_weights("cpu")
        weights.layers[0] = (qkv, (o_weight, None, None), gate_up, down)  # one weight not packed
        assert native.scripted_decode_layers(weights) is None


@pytest.mark.skipif(not decode_step.MKL_PACKED_LINEAR, reason="this torch build has no MKL packed GEMM")
def test_a_packed_weight_gives_f_linear_s_numbers_at_any_row_count(monkeypatch):
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 40) * 0.1, torch.randn(96)
    packed = decode_step.pack_weight(weight)
    assert packed is not None
    for rows in (1, 2, 7, 32, 33, 130):  # packed with a nominal 32 rows; used with every count a rollout has
        x = torch.randn(rows, 40)
        assert torch.allclose(decode_step.linear(x, weight, bias, packed), F.linear(x, weight, bias),
                              rtol=1e-5, atol=1e-5)
    assert decode_step.pack_weight(weight.double()) is None and decode_step.pack_weight(weight[0]) is None
    if decode_step.ONEDNN_PACKED_BF16_LINEAR:  # bf16 weights: oneDNN's reorder, the same kernel as F.linear's
        packed_bf16 = decode_step.pack_weight(weight.bfloat16())
        for rows in (1, 7, 33, 130):
            x = torch.randn(rows, 40)
            assert torch.equal(decode_step.linear(x, weight.bfloat16(), bias.bfloat16(), packed_bf16),
                               F.linear(x.bfloat16(), weight.bfloat16(), bias.bfloat16()))
    # Where the packed GEMM would not reproduce F.linear (checked once per shape), weights stay unpacked.
    monkeypatch.setattr(decode_step, "_PACKING_CHECKED", {})
    monkeypatch.setattr(decode_step, "F", SimpleNamespace(linear=lambda x, w, b=None: F.linear(x, w, b) + 1.0))
    assert decode_step.pack_weight(weight) is None


@pytest.mark.skipif(not decode_step.MKL_PACKED_LINEAR, reason="this torch build has no MKL packed GEMM")
def test_decoding_with_packed_weights_samples_what_plain_weights_sample(model_and_tokenizer, monkeypatch):
    """Packed weights change the GEMM's summation order only: the same tokens, log-probs to float rounding
    (float32: MKL; bf16 autocast: oneDNN, where this CPU has bf16). Not beyond PACKED_WEIGHTS_BUDGET."""
    from zerorl.lm import native as native_module

    model, tokenizer = model_and_tokenizer
    prompts, params = ["12+34=", "7-5=", "100+1=?"], SamplingParams(max_new_tokens=9, n=3, stop_strings=())
    engine, packed = _rollout(model, tokenizer, seed=3)
    packed_bf16 = HFRolloutEngine(model, tokenizer, autocast_dtype=torch.bfloat16).generate(prompts, params, seed=3)
    weights = engine.native.decode_weights()
    assert all(fused[2] is not None for layer in weights.layers for fused in layer) and weights.lm_head[2] is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_weights = engine.native.decode_weights("cpu")
    assert all((fused[2] is not None) == decode_step.ONEDNN_PACKED_BF16_LINEAR for fused in bf16_weights.layers[0])
    monkeypatch.setattr(native_module, "PACKED_WEIGHTS_BUDGET", 0)
    assert all(fused[2] is None for fused in engine.native.decode_weights().layers[0])
    _, plain = _rollout(model, tokenizer, seed=3)
    assert torch.equal(packed.completion_ids, plain.completion_ids)
    assert torch.allclose(packed.sampling_logprobs, plain.sampling_logprobs, atol=1e-5, rtol=0)
    plain_bf16 = HFRolloutEngine(model, tokenizer, autocast_dtype=torch.bfloat16).generate(prompts, params, seed=3)
    assert torch.equal(packed_bf16.completion_ids, plain_bf16.completion_ids)
    assert torch.allclose(packed_bf16.sampling_logprobs, plain_bf16.sampling_logprobs, atol=1e-2, rtol=0)


def test_finished_rows_leave_the_decode_batch_in_place_with_the_same_caches(model_and_tokenizer):
    """rollout.compaction_order moves only live rows from beyond the new size into finished slots below it;
    DecodeState.keep then copies those rows and cuts its caches (views): the same rows as a reindexed copy, and the
    next step gives the same logits."""
    from zerorl.lm.rollout import compaction_order

    finished = torch.tensor([False, True, False, False, True, False])
    assert compaction_order(finished).tolist() == [0, 5, 2, 3]
    assert compaction_order(torch.tensor([True, True])).tolist() == []
    assert compaction_order(torch.tensor([False, False, True])).tolist() == [0, 1]

    model, tokenizer = model_and_tokenizer
    decoder = NativeDecoder(model)
    encoded = tokenizer(["12+3=", "7*8=", "100-1="], return_tensors="pt", padding=True, padding_side="left")
    row_prompt = torch.tensor([0, 0, 1, 1, 2, 2])
    with torch.inference_mode():
        _, in_place = decoder.start_decoding(encoded.input_ids, encoded.attention_mask, row_prompt, 6)
        _, copied = decoder.start_decoding(encoded.input_ids, encoded.attention_mask, row_prompt, 6)
        tokens = torch.tensor([5, 6, 7, 8, 9, 10])
        in_place.step(tokens), copied.step(tokens)
        order = compaction_order(finished)
        storage = in_place.keys[0].untyped_storage().data_ptr()
        in_place.keep(order)
        copied.keep(order.flip(0))  # not a compaction: the general reindexing
        copied.keep(torch.arange(len(order)).flip(0))  # back to ``order``
        assert in_place.keys[0].untyped_storage().data_ptr() == storage  # moved in place, no new cache
        filled = in_place.column
        for mine, theirs in zip(in_place.keys + in_place.values, copied.keys + copied.values):
            assert mine.shape[0] == 4
            assert torch.equal(mine[:, :, :filled], theirs[:, :, :filled])  # the written columns
        assert torch.equal(in_place.positions, copied.positions)
        assert torch.equal(in_place.step(tokens[order]), copied.step(tokens[order]))


def test_native_decoding_samples_what_the_transformers_decoding_samples(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = ["12+34=", "7-5=", "100+1=?"]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, n=4, stop_strings=())
    plain = HFRolloutEngine(model, tokenizer, native=False).generate(prompts, params, seed=3)
    engine = HFRolloutEngine(model, tokenizer, native=True)
    assert engine.native is not None
    native = engine.generate(prompts, params, seed=3)
    assert torch.equal(native.completion_ids, plain.completion_ids)
    assert torch.equal(native.completion_mask, plain.completion_mask)
    assert (native.sampling_logprobs - plain.sampling_logprobs).abs().max() < 1e-5
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0, n=1, stop_strings=())
    assert HFRolloutEngine(model, tokenizer, native=False).generate(prompts, greedy).completion_texts == \
        engine.generate(prompts, greedy).completion_texts


def test_the_grpo_loss_on_a_fixed_batch_equals_the_plain_implementation(model_and_tokenizer):
    model, _ = model_and_tokenizer
    prompt_ids, prompt_mask, completion_ids, completion_mask = _random_batch(model.config.vocab_size, seed=5)
    gen = torch.Generator().manual_seed(7)
    batch = RolloutBatch(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                         completion_mask=completion_mask,
                         sampling_logprobs=torch.zeros(completion_ids.shape), prompt_index=torch.arange(6) // 2)
    batch.advantages = torch.randn(6, generator=gen)
    with torch.no_grad():  # π_old and π_ref near π_θ, as in training: ratios around 1, some clipped
        logprobs = torch.log_softmax(completion_logits(model, prompt_ids, prompt_mask, completion_ids,
                                                       completion_mask) / 0.7, -1)
        logprobs = logprobs.gather(-1, completion_ids[..., None]).squeeze(-1)
    batch.old_logprobs = (logprobs + 0.3 * torch.randn(logprobs.shape, generator=gen)) * completion_mask
    batch.ref_logprobs = (logprobs + 0.3 * torch.randn(logprobs.shape, generator=gen)) * completion_mask
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        config = TrainConfig(loss_type=loss_type, beta=0.04, temperature=0.7, max_completion_length=9).validate()
        plain, plain_metrics = grpo_loss(model, batch, config, on_policy=False)
        native, native_metrics = grpo_loss(model, batch, config, on_policy=False, native=NativeDecoder(model))
        assert 0.01 < abs(plain.item()) < 10  # a loss of ordinary size, so 1e-5 is a strict tolerance
        assert abs(native.item() - plain.item()) < 1e-5, loss_type
        assert abs(float(native_metrics["kl"]) - float(plain_metrics["kl"])) < 1e-5


def test_filler_rows_of_a_bucketed_packing_change_no_logit_and_no_gradient(model_and_tokenizer, monkeypatch):
    """Under autocast the packed length is rounded up with filler rows; they must be invisible. Checked in
    float32 (where bf16 rounding does not hide a difference) by forcing the bucket on."""
    import zerorl.lm.native as native_module

    model, _ = model_and_tokenizer
    batch = _random_batch(model.config.vocab_size)
    weights = torch.randn(batch[2].shape + (model.config.vocab_size,), generator=torch.Generator().manual_seed(2))
    weights = weights * batch[3][..., None]

    def logits_and_grads():
        model.zero_grad()
        logits = NativeDecoder(model).completion_logits(*batch)
        (logits * weights).sum().backward()
        return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    plain_logits, plain_grads = logits_and_grads()
    monkeypatch.setattr(native_module, "_row_bucket", lambda device: 64)
    packed = native_module._Layout.from_mask(batch[3].bool(), 64)
    assert len(packed.packed_index) == 64 and len(packed.index) == int(batch[3].sum())  # filler is really there
    bucket_logits, bucket_grads = logits_and_grads()
    assert torch.allclose(bucket_logits, plain_logits, atol=1e-6, rtol=0)
    for name, grad in plain_grads.items():
        assert torch.allclose(bucket_grads[name], grad, atol=1e-6, rtol=1e-5), name
    model.zero_grad()


def test_lora_wrapped_layers_run_as_modules(tmp_path):
    directory = build_tiny_model(tmp_path / "m", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    model, tokenizer = load_model_and_tokenizer(str(directory), native=False)
    apply_lora(model, rank=4, alpha=8.0)
    for name, p in model.named_parameters():  # make the adapters matter: B = 0 would hide a skipped adapter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    batch = _random_batch(model.config.vocab_size)
    mask = batch[3][..., None].bool()
    plain = completion_logits(model, *batch).masked_fill(~mask, 0)
    native = completion_logits(model, *batch, native=NativeDecoder(model)).masked_fill(~mask, 0)
    assert torch.allclose(native, plain, atol=1e-5, rtol=0)
    params = SamplingParams(max_new_tokens=8, n=2, stop_strings=())
    a = HFRolloutEngine(model, tokenizer, native=False).generate(["1+2="], params, seed=0)
    b = HFRolloutEngine(model, tokenizer, native=True).generate(["1+2="], params, seed=0)
    assert torch.equal(a.completion_ids, b.completion_ids)


def test_unsupported_architectures_fall_back_to_the_transformers_forward(tmp_path):
    from transformers import GPT2Config

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=99, n_embd=32, n_layer=1, n_head=2))
    assert "gpt2" in unsupported_reason(gpt2)
    with pytest.raises(ValueError, match="native_model=false"):
        NativeDecoder(gpt2)
    directory = build_tiny_model(tmp_path / "m", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    _, tokenizer = load_model_and_tokenizer(str(directory))
    engine = HFRolloutEngine(gpt2, tokenizer, native=True)
    assert engine.native is None
    out = engine.generate(["1+2="], SamplingParams(max_new_tokens=4, n=2, stop_strings=()), seed=0)
    assert out.completion_ids.shape[0] == 2


def test_swiglu_down_gradients_match_finite_differences():
    gen = torch.Generator().manual_seed(0)
    gate = torch.randn(3, 5, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    up = torch.randn(3, 5, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLUDown.apply, (gate, up, weight))  # backward: torch's silu_backward
    # A double backward (TRPO's Fisher-vector products) takes the differentiable spelling of silu'.
    assert torch.autograd.gradgradcheck(SwiGLUDown.apply, (gate, up, weight))
    expected = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, weight)
    assert torch.allclose(SwiGLUDown.apply(gate, up, weight), expected)


def test_both_spellings_of_the_silu_derivative_agree_with_autograd():
    gen = torch.Generator().manual_seed(1)
    gate = torch.randn(7, 9, dtype=torch.float64, generator=gen) * 4
    grad = torch.randn(7, 9, dtype=torch.float64, generator=gen)
    leaf = gate.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(torch.nn.functional.silu(leaf), leaf, grad)
    with torch.no_grad():
        fused = _silu_grad(grad, gate)
    with torch.enable_grad():
        spelled_out = _silu_grad(grad, gate)
    torch.testing.assert_close(fused, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(spelled_out, expected, rtol=1e-12, atol=1e-12)


def test_bf16_autocast_stays_close_to_float32(model_and_tokenizer):
    """bf16 autocast is a different precision, not different math: log-probs within bf16 rounding."""
    model, _ = model_and_tokenizer
    native = NativeDecoder(copy.deepcopy(model))
    batch = _random_batch(model.config.vocab_size, seed=9)
    mask = batch[3].bool()
    with torch.no_grad():
        exact = torch.log_softmax(native.completion_logits(*batch).float(), -1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = native.completion_logits(*batch)
        assert mixed.dtype == torch.bfloat16
        mixed = torch.log_softmax(mixed.float(), -1)
    assert (mixed - exact)[mask].abs().max() < 0.1


def test_under_bf16_autocast_attention_is_computed_in_float32(model_and_tokenizer):
    """The CPU's bf16 flash-attention backward is slow for short sequences; zerorl runs attention in float32
    there (the matrix products around it stay bf16): exactly SDPA over the float32 inputs, rounded once."""
    model, _ = model_and_tokenizer
    native = NativeDecoder(model)
    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, dim = native.num_heads, native.num_kv_heads, native.head_dim
    q = torch.randn(2, heads, 5, dim, generator=gen)  # float32: rotated by float32 cos/sin, as in the forward
    keys = torch.randn(2, kv_heads, 7, dim, generator=gen)
    values = torch.randn(2, kv_heads, 7, dim, generator=gen).to(torch.bfloat16)  # a bf16 projection's output
    mask = torch.rand(2, 1, 5, 7, generator=gen) > 0.3
    mask[..., 0] = True  # no empty softmax row
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = native._attend(q, keys, values, mask)
    group = heads // kv_heads
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, keys.repeat_interleave(group, 1), values.float().repeat_interleave(group, 1), attn_mask=mask,
        scale=native.scale).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


@pytest.mark.parametrize("lora", [False, True])
def test_a_model_with_bf16_weights_decodes_from_a_cache_of_its_own_dtype(tmp_path, lora):
    """Without autocast the KV cache takes the keys' dtype: a model loaded with dtype=bfloat16 attends in bf16 and
    hands bf16 attention outputs to its bf16 layers, module calls (LoRA-wrapped) included."""
    directory = build_tiny_model(tmp_path / "m", arch="qwen2", tokenizer="char", hidden_size=64, num_layers=2,
                                 num_heads=4, num_kv_heads=2)
    model, tokenizer = load_model_and_tokenizer(str(directory), dtype="bfloat16")
    if lora:
        apply_lora(model, rank=4)
    engine = HFRolloutEngine(model, tokenizer)
    prompt_ids = tokenizer(["12+34="], return_tensors="pt").input_ids
    with torch.no_grad():
        _, state = engine.native.start_decoding(prompt_ids, torch.ones_like(prompt_ids), torch.zeros(2, dtype=torch.long),
                                                max_new_tokens=4)
    assert {k.dtype for k in state.keys + state.values} == {torch.bfloat16}
    out = engine.generate(["12+34=", "7-5="], SamplingParams(max_new_tokens=6, n=2, stop_strings=()), seed=1)
    assert out.completion_ids.shape == (4, 6) and out.sampling_logprobs[out.completion_mask.bool()].isfinite().all()


def test_decode_attention_is_softmax_attention_in_the_cache_s_dtype_whatever_autocast_says():
    """attend_cache: softmax(q kᵀ + mask) v per key/value head, checked against float64; a float32 cache stays
    float32 under bf16 autocast (bmm's out= form is not an autocast op), a bf16 cache gives bf16."""
    gen = torch.Generator().manual_seed(4)
    rows, kv_heads, group, width, dim = 3, 2, 2, 6, 8
    q = torch.randn(rows, kv_heads, group, dim, generator=gen)
    keys, values = torch.randn(2, rows, kv_heads, width, dim, generator=gen)
    mask = torch.zeros(rows, 1, 1, width)
    mask[0, ..., :2] = float("-inf")  # row 0's prompt had two padding columns
    scores = q.double() @ keys.double().transpose(2, 3) + mask.double()
    expected = scores.softmax(-1) @ values.double()
    assert expected[0].isfinite().all()
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = decode_step.attend_cache(q, keys, values, mask)
            lower = decode_step.attend_cache(q, keys.bfloat16(), values.bfloat16(), mask)
        assert out.dtype == torch.float32 and out.shape == (rows, kv_heads, group, dim)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
        assert lower.dtype == torch.bfloat16
        torch.testing.assert_close(lower.double(), expected, rtol=0.05, atol=0.05)


def test_under_bf16_autocast_the_rollout_s_logprobs_are_the_training_pass_s(model_and_tokenizer):
    """On a CPU the decode's attention runs in float32 from a float32 cache, as the training pass's does
    (NativeDecoder._attend): under bf16 autocast the sampling log-probs, which GRPO reuses as π_old at μ = 1, are
    the training forward's. With the decode's attention in bf16 they were up to 0.06 apart on a sharper model, here ~2e-3 at most and ~5e-4 on average."""
    model, tokenizer = model_and_tokenizer
    engine = HFRolloutEngine(model, tokenizer, autocast_dtype=torch.bfloat16)
    out = engine.generate(["12+34=", "7-5=", "100+1=?"], SamplingParams(max_new_tokens=12, n=3, stop_strings=()),
                          seed=8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = engine.native.completion_logits(out.prompt_ids, out.prompt_mask, out.completion_ids,
                                                 out.completion_mask)
    training = torch.log_softmax(logits.float(), -1).gather(-1, out.completion_ids[..., None]).squeeze(-1)
    real = out.completion_mask.bool()
    assert real.sum() > 20
    gap = (out.sampling_logprobs - training)[real].abs()
    # Not bit for bit: bf16 matrix products of other shapes may round an output the other way (seen: ≤ 5e-4).
    assert gap.max() < 1e-3 and gap.mean() < 5e-5, (gap.max(), gap.mean())


def test_a_frozen_reference_kept_in_bf16_gives_the_same_bits_under_autocast(model_and_tokenizer):
    """store_for_autocast (bf16=true): the reference's matrix weights are stored as the bf16 casts autocast
    would make of them at every call — same numbers, half the memory, no casts."""
    from zerorl.lm.forward import completion_logits as transformers_logits
    from zerorl.lm.runtime import store_for_autocast

    model, _ = model_and_tokenizer
    as_is, stored = copy.deepcopy(model).requires_grad_(False), copy.deepcopy(model).requires_grad_(False)
    store_for_autocast(stored, TrainConfig(bf16=False))
    assert all(p.dtype == torch.float32 for p in stored.parameters())  # bf16=false: untouched
    store_for_autocast(stored, TrainConfig(bf16=True))
    assert stored.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert stored.get_input_embeddings().weight.dtype == torch.float32  # looked up, not multiplied: as it was
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert size(stored) < 0.75 * size(as_is)
    batch = _random_batch(model.config.vocab_size, seed=5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for forward in (lambda m: NativeDecoder(m).completion_logits(*batch),
                        lambda m: transformers_logits(m, *batch)):
            assert torch.equal(forward(stored), forward(as_is))
        stored.load_state_dict(as_is.state_dict())  # a reference refresh or a resume from float32 weights
        assert torch.equal(NativeDecoder(stored).completion_logits(*batch),
                           NativeDecoder(as_is).completion_logits(*batch))


def test_bf16_autocast_decoding_samples_valid_tokens_with_their_logprobs(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = HFRolloutEngine(model, tokenizer, autocast_dtype=torch.bfloat16)
    out = engine.generate(["12+34=", "7-5="], SamplingParams(max_new_tokens=10, n=3, stop_strings=()), seed=0)
    mask = out.completion_mask.bool()
    assert out.completion_ids.shape[0] == 6 and mask.any()
    assert torch.isfinite(out.sampling_logprobs).all() and (out.sampling_logprobs[mask] <= 0).all()
    # The reported log-probs are those of the bf16 forward: a float32 re-scoring agrees to bf16 rounding.
    with torch.no_grad():
        rescored = torch.log_softmax(completion_logits(model, out.prompt_ids, out.prompt_mask, out.completion_ids,
                                                       out.completion_mask), -1)
    rescored = rescored.gather(-1, out.completion_ids[..., None]).squeeze(-1)
    assert (rescored - out.sampling_logprobs)[mask].abs().max() < 0.15
