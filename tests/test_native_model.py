"""zerorl's own Llama-family module (zerorl.lm.native_model): the same function, names and files as the
transformers model, without importing transformers' modeling code."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from zerorl.lm.models import build_tiny_model, load_model_and_tokenizer
from zerorl.lm.native_model import NativeCausalLM


@pytest.fixture(scope="module", params=[("qwen2", "char"), ("llama", "bpe")], ids=["qwen2", "llama"])
def directory(request, tmp_path_factory):
    arch, tokenizer = request.param
    return build_tiny_model(tmp_path_factory.mktemp(arch) / "m", arch=arch, tokenizer=tokenizer, hidden_size=64,
                            num_layers=2, num_heads=4, num_kv_heads=2)


def _batch(vocab: int):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[1, -2:] = 0  # right padding
    return ids, mask


def test_logits_hidden_states_loss_and_gradients_equal_transformers(directory):
    native, _ = load_model_and_tokenizer(str(directory))
    reference, _ = load_model_and_tokenizer(str(directory), native=False)
    assert isinstance(native, NativeCausalLM) and not isinstance(reference, NativeCausalLM)
    ids, mask = _batch(native.config.vocab_size)
    real = mask[..., None].bool()
    a = reference(input_ids=ids, attention_mask=mask).logits
    b = native(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(a.masked_fill(~real, 0), b.masked_fill(~real, 0), atol=1e-5, rtol=0)
    h_a = reference.model(input_ids=ids, attention_mask=mask).last_hidden_state
    h_b = native.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(h_a.masked_fill(~real, 0), h_b.masked_fill(~real, 0), atol=1e-5, rtol=0)
    # The SFT loss (labels, −100 ignored) and its gradients.
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 3] = -100  # predicted from a padding position, whose output means nothing (differs by design)
    loss_a = reference(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss_b = native(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert abs(loss_a.item() - loss_b.item()) < 1e-5
    loss_a.backward()
    loss_b.backward()
    grads = dict(native.named_parameters())
    for name, p in reference.named_parameters():
        assert torch.allclose(grads[name].grad, p.grad, atol=1e-5, rtol=1e-4), name


def test_saved_files_load_in_transformers_and_back(directory, tmp_path):
    native, _ = load_model_and_tokenizer(str(directory))
    with torch.no_grad():
        for p in native.parameters():
            p.add_(0.01)  # a trained model, not the file it came from
    native.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    native_state = native.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, native_state[name]), name
    again, _ = load_model_and_tokenizer(str(tmp_path / "saved")) if (tmp_path / "saved" / "tokenizer.json").exists() \
        else (None, None)
    if again is not None:
        assert all(torch.equal(x, y) for x, y in zip(again.state_dict().values(), native_state.values()))


def test_other_architectures_and_native_false_load_with_transformers(tmp_path):
    from transformers import GPT2Config

    AutoModelForCausalLM.from_config(GPT2Config(vocab_size=99, n_embd=32, n_layer=1, n_head=2)) \
        .save_pretrained(tmp_path / "gpt2")
    build_tiny_model(tmp_path / "tok", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tmp_path / "tok" / name).exists():
            (tmp_path / "gpt2" / name).write_bytes((tmp_path / "tok" / name).read_bytes())
    model, _ = load_model_and_tokenizer(str(tmp_path / "gpt2"))
    assert type(model).__name__ == "GPT2LMHeadModel"


def test_loading_does_not_import_the_transformers_modeling_code(directory):
    """The point of the module: ~100 MB of resident memory (torch.fx, dynamo, sympy) not paid for. (For
    Llama, transformers' own LlamaConfig module imports torch.distributed.tensor and sympy; Qwen2's does not.)"""
    heavy = ("transformers.modeling_utils",) + (("torch._dynamo", "sympy") if "qwen2" in str(directory) else ())
    code = ("import sys\nfrom zerorl.lm.models import load_model_and_tokenizer\n"
            f"load_model_and_tokenizer({str(directory)!r})\n"
            f"print([m for m in {heavy!r} if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
