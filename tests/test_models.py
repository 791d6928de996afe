"""zerorl.lm.models: tiny model directories, tokenizers, loading errors, atomic saves."""

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from zerorl.lm.models import (
    DEFAULT_CHARSET,
    ModelNotFoundError,
    build_bpe_tokenizer,
    build_char_tokenizer,
    build_tiny_model,
    count_parameters,
    load_model_and_tokenizer,
    model_memory_bytes,
    save_model,
)

R1_TEXT = "<think>7+8=15</think> <answer>85</answer>\n"
SMALL = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, max_position_embeddings=128)


def _random_ascii(rng, count=100, length=60):
    return [''.join(rng.choice(DEFAULT_CHARSET) for _ in range(length)) for _ in range(count)]


@pytest.fixture(scope="module")
def small_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        (arch, tok): build_tiny_model(root / f"{arch}-{tok}", arch=arch, tokenizer=tok, **SMALL)
        for arch, tok in [("qwen2", "char"), ("llama", "bpe"), ("llama", "char")]
    }


def test_char_tokenizer_is_one_token_per_character_and_round_trips():
    tokenizer = build_char_tokenizer()
    assert len(tokenizer) == 2 + 97  # <pad>, <|endoftext|>, printable ASCII + \n + \t
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    assert tokenizer.padding_side == "left"
    for text in [R1_TEXT, "  two  spaces . and ,\ttab\n\n", *_random_ascii(random.Random(0))]:
        ids = tokenizer(text)["input_ids"]
        assert len(ids) == len(text)
        assert tokenizer.decode(ids) == text
    # "<" and ">" are separate tokens; no special token hides inside the R1 tags
    assert tokenizer.convert_ids_to_tokens(tokenizer("<a>")["input_ids"]) == ["<", "a", ">"]


def test_bpe_tokenizer_round_trips_any_text_and_merges_common_pieces():
    tokenizer = build_bpe_tokenizer(vocab_size=400)
    assert len(tokenizer) == 400
    for text in [R1_TEXT, "naïve café ünïcode → ok", *_random_ascii(random.Random(1), count=30)]:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    # merges were learned: the tag and English words take fewer tokens than characters
    assert len(tokenizer("</answer> the answer")["input_ids"]) < len("</answer> the answer") // 2
    with pytest.raises(ValueError, match="bpe_vocab_size=100"):
        build_bpe_tokenizer(vocab_size=100)


@pytest.mark.parametrize("key", [("qwen2", "char"), ("llama", "bpe"), ("llama", "char")])
def test_saved_directory_reloads_with_auto_classes(small_dirs, key):
    path = small_dirs[key]
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json"} <= names
    assert not [p.name for p in path.parent.iterdir() if p.name.startswith(".")]  # temp dirs renamed away
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == key[0]
    assert config["tie_word_embeddings"] is (key[0] == "qwen2")
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    # transformers 5 rebuilds qwen2 tokenizers with a fixed pipeline; ours must survive that
    for text in [R1_TEXT, *_random_ascii(random.Random(2), count=20)]:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    if key[1] == "char":
        assert len(tokenizer(R1_TEXT)["input_ids"]) == len(R1_TEXT)
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False,
                                         add_generation_prompt=True) == (
        "user: 2+2?\nassistant: " if key[1] == "char"
        else "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_default_model_has_the_documented_size(tmp_path):
    path = build_tiny_model(tmp_path / "default")
    model, tokenizer = load_model_and_tokenizer(path)
    h, vocab, kv = 128, 99, 64  # kv = num_kv_heads * head_dim = 2 * 32
    per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * 5 * h + 2 * h  # q,k,v(+bias), o, mlp, norms
    expected = vocab * h + 4 * per_layer + h  # tied embeddings counted once, final norm
    assert count_parameters(model) == (expected, expected) == (1_194_496, 1_194_496)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    # float32 weights plus the small rotary inv_freq buffers
    assert 4 * expected <= model_memory_bytes(model) <= 4 * expected + 1024
    model.model.embed_tokens.weight.requires_grad_(False)
    assert count_parameters(model) == (expected - vocab * h, expected)


def test_load_dtype_and_device(small_dirs):
    model, tokenizer = load_model_and_tokenizer(small_dirs[("qwen2", "char")], dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<pad>"
    with pytest.raises(ValueError, match="dtype='float8'"):
        load_model_and_tokenizer(small_dirs[("qwen2", "char")], dtype="float8")


@pytest.mark.parametrize("path", ["./no/such/model", "/definitely/not/here", "a/b/c"])
def test_missing_local_path_is_a_clear_error(path):
    with pytest.raises(ModelNotFoundError) as info:
        load_model_and_tokenizer(path)
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert repr(path) in message and "zerorl sft" in message and "hub id" in message


def test_existing_parent_makes_a_two_part_name_local(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="'runs/sft' does not exist"):
        load_model_and_tokenizer("runs/sft")


def test_directory_without_config_is_a_clear_error(tmp_path):
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(ModelNotFoundError, match="has no config.json") as info:
        load_model_and_tokenizer(tmp_path)
    assert "weights.bin" in str(info.value)


def test_unfetchable_hub_id_explains_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never touch the network
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE") as info:
        load_model_and_tokenizer("zerorl-test-org/no-such-model")
    assert "offline" in str(info.value)


def test_pad_token_falls_back_to_eos(small_dirs, tmp_path):
    model, tokenizer = load_model_and_tokenizer(small_dirs[("llama", "bpe")])
    tokenizer.pad_token = None
    path = save_model(model, tokenizer, tmp_path / "nopad")
    with pytest.warns(UserWarning, match="no pad token"):
        _, reloaded = load_model_and_tokenizer(path)
    assert reloaded.pad_token_id == reloaded.eos_token_id == 1
    assert reloaded.padding_side == "left"


def test_save_model_replaces_atomically(small_dirs, tmp_path):
    model, tokenizer = load_model_and_tokenizer(small_dirs[("qwen2", "char")])
    target = save_model(model, tokenizer, tmp_path / "ckpt")
    with torch.no_grad():
        model.model.norm.weight.fill_(3.0)
    save_model(model, tokenizer, target)  # overwrite an existing directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp/old leftovers
    reloaded, _ = load_model_and_tokenizer(target)
    assert torch.equal(reloaded.model.norm.weight, torch.full((32,), 3.0))


def test_padded_vocabulary_reaches_the_size_and_every_id_decodes(tmp_path):
    """pad_vocab_to: a benchmark model with a real model's vocabulary size; sampled ids beyond the trained
    tokens still decode (to filler tokens), and the prompt's tokenization is unchanged by the padding."""
    plain = build_tiny_model(tmp_path / "plain", tokenizer="bpe", hidden_size=32, num_layers=1, num_heads=2,
                             num_kv_heads=1)
    padded = build_tiny_model(tmp_path / "padded", tokenizer="bpe", hidden_size=32, num_layers=1, num_heads=2,
                              num_kv_heads=1, pad_vocab_to=2048)
    tok, tok_plain = AutoTokenizer.from_pretrained(padded), AutoTokenizer.from_pretrained(plain)
    assert len(tok) == 2048 and json.loads((padded / "config.json").read_text())["vocab_size"] == 2048
    text = "What is 12 + 30? <answer>42</answer>"
    assert tok(text).input_ids == tok_plain(text).input_ids
    assert tok.decode([2047]) == "<|filler_1535|>" and tok.decode([len(tok_plain)]) == "<|filler_0|>"
    with pytest.raises(ValueError, match="pad_vocab_to=10"):
        build_tiny_model(tmp_path / "small", tokenizer="bpe", pad_vocab_to=10)
