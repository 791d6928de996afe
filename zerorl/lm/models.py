"""Models and tokenizers: build the tiny default model, load any causal LM, save atomically.

The tiny default is an ordinary Hugging Face model directory (config.json, model.safetensors,
generation_config.json, tokenizer.json, tokenizer_config.json, special_tokens_map.json), so
transformers, TRL and vLLM load it exactly like a hub checkpoint. Two flavours:

* `arch="qwen2", tokenizer="char"` (default): ~1.2M parameters, one token per printable ASCII
  character. Small vocab = cheap softmax, and every digit is its own token, which is what makes
  arithmetic learnable by a model this small on a 2-core CPU.
* `arch="llama", tokenizer="bpe"`: a byte-level BPE trained here on a synthetic corpus, with a
  ChatML chat template. It exists to prove no code path assumes one token per character.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# Printable ASCII (space .. ~) plus newline and tab: 97 characters. \r, \x0b and \x0c are left out
# on purpose; they only appear in text by accident and would waste output logits.
DEFAULT_CHARSET = "".join(chr(c) for c in range(32, 127)) + "\n\t"

# "role: content\n" per message; the generation prompt is "assistant: ". Plain text so the char
# tokenizer needs no extra special tokens.
CHAR_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ message['role'] + ': ' + message['content'] + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'assistant: ' }}{%- endif -%}"
)
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


class ModelNotFoundError(FileNotFoundError):
    """A model path or hub id that cannot be resolved to a loadable model."""


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------
# Both tokenizers use exactly the pipeline that transformers 5 hard-codes for model_type "qwen2"
# (Qwen2Tokenizer: NFC, this split regex, byte-level BPE without unk). AutoTokenizer rebuilds a
# Qwen2 tokenizer with that pipeline from our vocab/merges, ignoring tokenizer.json's own
# pre-tokenizer; matching it here means the tokenizer we build, the one AutoTokenizer reloads,
# and the ones TRL/vLLM load all split text identically, whatever the architecture.
# The regex also isolates single digits, which is what arithmetic wants.
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _byte_level_backend(vocab: dict[str, int] | None = None, merges: list | None = None) -> Tokenizer:
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None) if vocab is not None
                        else models.BPE(unk_token=None))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    return backend


def _wrap_tokenizer(
    backend: Tokenizer, chat_template: str, model_max_length: int, extra_special: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",  # generation appends on the right, so prompts are padded on the left
        truncation_side="left",
        # The default cleanup rewrites " ." into "."; that would break exact round trips.
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )
    if extra_special:
        tokenizer.add_special_tokens({"additional_special_tokens": list(extra_special)})
    tokenizer.chat_template = chat_template
    return tokenizer


def build_char_tokenizer(charset: str | None = None, model_max_length: int = 256) -> PreTrainedTokenizerFast:
    """One token per character: id 0 is <pad>, id 1 is <|endoftext|> (eos), then `charset`.

    Implemented as a byte-level BPE with an empty merge list: every byte of the text becomes one
    token and the ByteLevel decoder joins them back with nothing in between, so
    decode(encode(s)) == s for any string made of `charset` characters (ASCII characters are one
    byte = one token; a non-ASCII character in `charset` becomes its UTF-8 bytes). Characters whose
    bytes are not in the vocabulary are dropped by the encoder (Qwen2's BPE has no unk token), so
    pass a wider `charset` if your data needs one.
    """
    charset = DEFAULT_CHARSET if charset is None else charset
    symbols = list(dict.fromkeys(_BYTE_SYMBOLS[b] for b in charset.encode("utf-8")))
    if not symbols:
        raise ValueError("charset is empty; pass a string of characters (or None for printable ASCII).")
    specials = [PAD_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(specials + symbols)}
    backend = _byte_level_backend(vocab, merges=[])
    backend.add_special_tokens(specials)
    return _wrap_tokenizer(backend, CHAR_CHAT_TEMPLATE, model_max_length)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-unicode map used by byte-level BPE (ByteLevel pre-tokenizer)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


_BYTE_SYMBOLS = _bytes_to_unicode()


_FILLER_WORDS = (
    "the a an and or but so then first next finally we you it is are was be to of in on at for with "
    "number numbers sum add subtract multiply divide equals answer think step check result total left "
    "right value each both only use once make target equation list digit carry because therefore let "
    "us try again correct wrong good small large more less than plus minus times over"
).split()


def synthetic_corpus(num_lines: int = 4000, seed: int = 0) -> list[str]:
    """Deterministic training text for the BPE tokenizer: arithmetic, countdown and filler lines.

    It mirrors what the tiny models will see (R1-Zero tags, digits, operators, short English), so
    the learned merges are useful without shipping any external data.
    """
    rng = random.Random(seed)
    lines = [
        "A conversation between User and Assistant. The user asks a question, and the Assistant "
        "solves it. The assistant first thinks about the reasoning process in the mind and then "
        "provides the user with the answer."
    ]
    for _ in range(num_lines):
        kind = rng.random()
        if kind < 0.4:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            op = rng.choice("+-*")
            value = eval(f"{a}{op}{b}")  # noqa: S307 - two integer literals built right here
            lines.append(f"User: What is {a}{op}{b}? Assistant: <think>{a}{op}{b}={value}</think> "
                         f"<answer>{value}</answer>")
        elif kind < 0.7:
            nums = [rng.randint(1, 99) for _ in range(rng.randint(3, 4))]
            target = rng.randint(1, 200)
            lines.append(f"Using the numbers {nums}, create an equation that equals {target}. "
                         f"<think>{nums[0]} + {nums[1]} = {nums[0] + nums[1]}</think> "
                         f"<answer>({nums[0]} + {nums[1]}) - {nums[2]}</answer>")
        else:
            words = [rng.choice(_FILLER_WORDS) for _ in range(rng.randint(5, 15))]
            lines.append(" ".join(words).capitalize() + rng.choice(".?!"))
    return lines


def build_bpe_tokenizer(
    corpus: Sequence[str] | None = None, vocab_size: int = 512, model_max_length: int = 256
) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained locally (tokenizers' BpeTrainer) with ChatML special tokens.

    Byte-level means every string round-trips exactly (all 256 bytes are in the base alphabet).
    """
    specials = [PAD_TOKEN, EOS_TOKEN, IM_START, IM_END]
    min_vocab = len(specials) + 256
    if vocab_size < min_vocab:
        raise ValueError(f"bpe_vocab_size={vocab_size} is too small; byte-level BPE needs at least "
                         f"{min_vocab} (256 bytes + {len(specials)} special tokens).")
    backend = _byte_level_backend()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(synthetic_corpus() if corpus is None else list(corpus), trainer=trainer)
    return _wrap_tokenizer(backend, CHATML_TEMPLATE, model_max_length, extra_special=(IM_START, IM_END))


# --------------------------------------------------------------------------------------------
# The tiny default model
# --------------------------------------------------------------------------------------------
def build_tiny_model(
    output_dir: str | os.PathLike,
    arch: str = "qwen2",
    tokenizer: str = "char",
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 256,
    seed: int = 0,
    charset: str | None = None,
    bpe_corpus: Sequence[str] | None = None,
    bpe_vocab_size: int = 512,
    tie_word_embeddings: bool | None = None,
    pad_vocab_to: int | None = None,
) -> Path:
    """Write a randomly initialised causal LM + tokenizer as a standard HF model directory.

    Defaults give a Qwen2 with hidden 128, 4 layers, 4 query / 2 key-value heads (GQA, like real
    Qwen2), MLP width 5*hidden and tied input/output embeddings: ~1.2M parameters with the char
    tokenizer. `intermediate_size=None` means 5*hidden_size. `tie_word_embeddings=None` means
    tied for qwen2 and untied for llama, so both code paths get exercised. `pad_vocab_to` adds filler
    tokens (`<|filler_i|>`, ordinary added tokens) up to that vocabulary size, so that a benchmark model can
    have a real model's embedding and LM-head shapes (Qwen2: 151,936) while every id still decodes to text.
    Returns the output directory.
    """
    if arch not in ("qwen2", "llama"):
        raise ValueError(f"arch={arch!r} is not supported; use 'qwen2' or 'llama'.")
    if tokenizer not in ("char", "bpe"):
        raise ValueError(f"tokenizer={tokenizer!r} is not supported; use 'char' or 'bpe'.")
    if hidden_size % num_heads != 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}, and "
                         f"num_heads by num_kv_heads={num_kv_heads}.")
    if tokenizer == "char":
        tok = build_char_tokenizer(charset, model_max_length=max_position_embeddings)
    else:
        tok = build_bpe_tokenizer(bpe_corpus, bpe_vocab_size, model_max_length=max_position_embeddings)
    if pad_vocab_to is not None:
        if pad_vocab_to < len(tok):
            raise ValueError(f"pad_vocab_to={pad_vocab_to} is smaller than the tokenizer's {len(tok)} tokens. "
                             f"Fix: pad_vocab_to ≥ {len(tok)}, or None for the tokenizer's own size.")
        tok.add_tokens([f"<|filler_{i}|>" for i in range(pad_vocab_to - len(tok))])
    pad_id, eos_id = tok.pad_token_id, tok.eos_token_id
    # ChatML models end an assistant turn with <|im_end|>; treat it as a second end-of-sequence.
    eos_ids = [eos_id] + ([tok.convert_tokens_to_ids(IM_END)] if tokenizer == "bpe" else [])
    config_kwargs = dict(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 5 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        # No BOS is ever prepended (as in Qwen2); bos id = eos id is what Qwen2 configs carry too.
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=(arch == "qwen2") if tie_word_embeddings is None else tie_word_embeddings,
    )
    if arch == "qwen2":
        config = Qwen2Config(**config_kwargs)
    else:
        from transformers import LlamaConfig  # imported here: its module pulls in ~55 MB (sympy, dynamo)

        config = LlamaConfig(**config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=eos_id, eos_token_id=eos_ids if len(eos_ids) > 1 else eos_id, pad_token_id=pad_id
    )
    return save_model(model, tok, output_dir)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def _looks_local(name: str) -> bool:
    """True when `name` can only mean a local path (a hub id is `name` or `org/name`)."""
    if name in (".", "..") or name.startswith(("./", "../", "/", "~", ".\\")) or os.path.isabs(name):
        return True
    parts = [p for p in name.replace("\\", "/").split("/") if p]
    if len(parts) > 2 or name.endswith("/"):
        return True
    # "runs/sft" where ./runs exists is someone's output directory, not a hub organisation.
    return len(parts) == 2 and Path(parts[0]).is_dir()


def _missing_model_message(path: str) -> str:
    return (f"model path {path!r} does not exist (resolved to {Path(path).expanduser().resolve()}). "
            "Check the path, build a model first with `zerorl sft` (or zerorl.lm.models.build_tiny_model), "
            "or pass a Hugging Face hub id such as 'Qwen/Qwen2.5-0.5B'.")


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    native: bool = True,
):
    """Load `(model, tokenizer)` from a local directory or a hub id.

    `native=True` builds a local Llama / Qwen2 / Qwen3 safetensors checkpoint with zerorl's own module
    (``zerorl.lm.native_model``: same names, files and function, without transformers' modeling code);
    other models, hub ids and `native=False` load with transformers' AutoModelForCausalLM.

    The tokenizer always has a pad token (falls back to eos, with a warning) and pads on the left,
    which is what batched generation needs. Raises ModelNotFoundError for a missing local path, a
    directory without config.json, or a hub id that cannot be fetched.
    """
    name = os.fspath(name_or_path)
    if dtype != "auto" and dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(_DTYPES)} or 'auto'.")
    torch_dtype = "auto" if dtype == "auto" else _DTYPES[dtype]
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelNotFoundError(f"model path {name!r} is a file; pass the model directory that "
                                     "contains config.json.")
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(
                f"model directory {name!r} has no config.json, so it is not a Hugging Face model "
                f"directory (it contains: {sorted(p.name for p in local.iterdir())[:10]}). Pass the "
                "directory written by `zerorl sft` / save_model, or a hub id.")
        source = str(local)
    elif _looks_local(name):
        raise ModelNotFoundError(_missing_model_message(name))
    else:
        source = name  # a hub id
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = None
        if native and local.exists():
            from zerorl.lm.native_model import load_native_model

            model = load_native_model(source, dtype=torch_dtype)
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=torch_dtype, trust_remote_code=trust_remote_code
            )
    except OSError as error:
        if source != name:  # local directory: a broken checkpoint is not a "not found" problem
            raise
        raise ModelNotFoundError(
            f"could not load {name!r}: it is not a local directory and fetching it from the Hugging "
            "Face hub failed. If it is a local path, check the spelling; if it is a hub id, this "
            "machine may be offline (HF_HUB_OFFLINE=1 only uses the local cache; download it once "
            f"with network access). Original error: {error}") from error
    model.to(device)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name!r} has neither a pad nor an eos token; set one.")
        warnings.warn(f"tokenizer of {name!r} has no pad token; using eos {tokenizer.eos_token!r} as pad. "
                      "Padding is masked out, so this is harmless.", stacklevel=2)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once."""
    params = list(model.parameters())  # .parameters() already de-duplicates shared tensors
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def model_memory_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (tied tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------
def save_model(model, tokenizer, output_dir: str | os.PathLike) -> Path:
    """Save model (safetensors) + tokenizer into `output_dir` atomically.

    Everything is written to a temporary sibling directory first and renamed into place, so a
    crash mid-save never leaves a half-written model where a loader would find it. An existing
    `output_dir` is replaced (moved aside, then deleted after the rename succeeded).
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        special_map = tmp_dir / "special_tokens_map.json"
        if not special_map.exists():  # transformers 5 folds it into tokenizer_config.json
            tokens = {key: str(value) for key, value in tokenizer.special_tokens_map.items()}
            special_map.write_text(json.dumps(tokens, indent=2) + "\n")
        if output_dir.exists():
            old_dir = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
            os.replace(output_dir, old_dir)
            os.replace(tmp_dir, output_dir)
            shutil.rmtree(old_dir, ignore_errors=True)
        else:
            os.replace(tmp_dir, output_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return output_dir


__all__ = [
    "DEFAULT_CHARSET",
    "ModelNotFoundError",
    "build_bpe_tokenizer",
    "build_char_tokenizer",
    "build_tiny_model",
    "count_parameters",
    "load_model_and_tokenizer",
    "model_memory_bytes",
    "save_model",
    "synthetic_corpus",
]
