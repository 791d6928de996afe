"""The reference model's weights in the page cache (zerorl.lm.page_cache): same numbers, writes kept across a
release, pages out of the resident set after one, the same training run as with the weights in memory."""

from __future__ import annotations

import copy
import errno
import json
import os

import pytest
import torch

from zerorl.config import ConfigError, TrainConfig, build_config
from zerorl.lm.models import build_tiny_model, load_model_and_tokenizer
from zerorl.lm.page_cache import PageCacheWeights, offload_reference, page_cache_supported

pytestmark = pytest.mark.skipif(not page_cache_supported(), reason="needs Linux's madvise(MADV_DONTNEED)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("pages") / "model", hidden_size=64, num_layers=2,
                            num_heads=4, num_kv_heads=2, seed=5)
    model, _ = load_model_and_tokenizer(str(path))
    return model.eval().requires_grad_(False)


def _logits(model):
    ids = torch.tensor([[3, 17, 25, 40, 9, 11]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_mapped_weights_give_the_same_numbers_and_leave_the_resident_set(tiny, tmp_path):
    ref = copy.deepcopy(tiny)
    before = {name: p.clone() for name, p in ref.named_parameters()}
    expected = _logits(ref)
    tied = ref.get_input_embeddings().weight is ref.get_output_embeddings().weight
    pages = PageCacheWeights(ref, tmp_path)

    assert pages.nbytes >= sum(p.numel() * p.element_size() for p in ref.parameters())
    assert pages.resident_bytes() == 0  # released at construction
    for name, p in ref.named_parameters():
        assert torch.equal(p, before[name]), name
    assert (ref.get_input_embeddings().weight is ref.get_output_embeddings().weight) == tied
    assert torch.equal(_logits(ref), expected)
    assert pages.resident_bytes() > 0  # the forward pass mapped the pages back in
    pages.release()
    assert pages.resident_bytes() == 0
    assert torch.equal(_logits(ref), expected)  # and they map back in with the same bytes
    assert list(tmp_path.iterdir()) == []  # the file is unlinked: nothing to clean up


def test_writes_survive_a_release(tiny, tmp_path):
    """load_state_dict (a resume, ref_model_sync_steps) writes through the shared mapping to the file: dropping
    the pages must not bring back the old values."""
    ref = copy.deepcopy(tiny)
    pages = PageCacheWeights(ref, tmp_path)
    other = copy.deepcopy(tiny)
    for p in other.parameters():  # new values with the same ties (a tied weight is one Parameter)
        p.add_(torch.randn_like(p))
    new_state = other.state_dict()
    ref.load_state_dict(new_state)
    pages.release()
    assert pages.resident_bytes() == 0
    for name, tensor in ref.state_dict().items():
        assert torch.equal(tensor, new_state[name]), name


def test_a_full_disk_fails_up_front_with_the_fix_or_keeps_the_weights_in_memory(tiny, tmp_path, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    ref = copy.deepcopy(tiny)
    with pytest.raises(OSError, match="free disk space there, or set ref_offload=false"):
        PageCacheWeights(ref, tmp_path)
    with pytest.raises(OSError, match="ref_offload=false"):  # asked for: the error
        offload_reference(ref, TrainConfig(ref_offload=True), tmp_path, torch.device("cpu"))

    def not_supported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(os, "posix_fallocate", not_supported)
    with pytest.raises(OSError, match="output_dir on a local disk"):  # not a space problem: another fix
        PageCacheWeights(ref, tmp_path)
    # By default the weights stay in memory, untouched.
    assert offload_reference(ref, TrainConfig(ref_offload=None), tmp_path, torch.device("cpu")) is None
    assert torch.equal(_logits(ref), _logits(tiny))


def test_ref_offload_chooses_where_the_weights_live(tiny, tmp_path):
    config = TrainConfig(ref_offload=None)
    assert offload_reference(None, config, tmp_path, torch.device("cpu")) is None
    assert offload_reference(copy.deepcopy(tiny), TrainConfig(ref_offload=False), tmp_path,
                             torch.device("cpu")) is None
    assert offload_reference(copy.deepcopy(tiny), config, tmp_path, torch.device("cuda")) is None  # auto: GPU
    assert isinstance(offload_reference(copy.deepcopy(tiny), config, tmp_path, torch.device("cpu")),
                      PageCacheWeights)
    with pytest.raises(ConfigError, match="ref_offload"):
        offload_reference(copy.deepcopy(tiny), TrainConfig(ref_offload=True), tmp_path, torch.device("cuda:0"))
    with pytest.raises(ConfigError, match="ref_offload"):
        build_config(TrainConfig, None, {"ref_offload": "true", "device": "cuda"})


def _run(model_dir, out, **overrides):
    from zerorl.lm.grpo import train

    values = {"model": str(model_dir), "task": "arithmetic", "output_dir": str(out), "num_eval": 4,
              "eval_samples_per_prompt": 1, "prompts_per_step": 4, "num_generations": 4,
              "max_completion_length": 12, "template": "compact", "progress": False, "plots": False, "save_steps": 0, "max_steps": 3,
              "eval_at_start": False, "eval_at_end": False, "learning_rate": 1e-3, "warmup_steps": 0,
              "beta": 0.1, "ref_model_sync_steps": 2, "num_iterations": 2} | overrides
    train(build_config(TrainConfig, None, values))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("time/") and k not in ("step_time",
                                                                                  "tokens_per_second")}
            for row in rows if "step" in row and "kl" in row]


def test_grpo_with_the_reference_in_the_page_cache_is_the_same_run(random_tiny_model, digits_reward, tmp_path):
    """The KL term, the refresh (ref_model_sync_steps = 2 of 3 steps) and every logged number: identical."""
    in_memory = _run(random_tiny_model, tmp_path / "memory", ref_offload=False, reward_funcs=[digits_reward])
    paged = _run(random_tiny_model, tmp_path / "paged", ref_offload=True, reward_funcs=[digits_reward])
    assert len(in_memory) == 3
    assert any(row["kl"] > 0 for row in in_memory)
    assert paged == in_memory
