"""The arithmetic of benchmarks/floor.py and benchmarks/vs_trl.py: FLOP counts, warm-up handling, ratios.

No timing is asserted (benchmarks are scripts); TRL is never installed or run here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import floor  # noqa: E402
import vs_trl  # noqa: E402


def test_step_flops_per_parameter_by_phase():
    # P=2 prompts × G=3, 10 prompt tokens in all, 30 completion tokens in all:
    # sequence tokens = 3·10 + 30 = 60; FLOPs/param = 2·10 + 2·30 + 2·60 + 6·60 = 560.
    work = floor.StepWork(prompts=2, generations=3, prompt_tokens=10, completion_tokens=30)
    assert work.sequence_tokens == 60
    phases = work.phases()
    assert [(name, tokens, per_param, rows) for name, tokens, per_param, rows in phases] == [
        ("generation: prefill", 10, 2.0, 10),
        ("generation: decode", 30, 2.0, 6),
        ("reference forward", 60, 2.0, 60),
        ("training fwd+bwd", 60, 6.0, 60),
    ]
    assert sum(tokens * per_param for _, tokens, per_param, _ in phases) == 560
    no_ref = floor.StepWork(2, 3, 10, 30, with_reference=False)
    assert sum(t * f for _, t, f, _ in no_ref.phases()) == 440


def test_floor_seconds_are_flops_over_rate(monkeypatch):
    calls = []

    def fake_rate(shape, rows, dtype, backward, repeats=5):
        calls.append((rows, backward))
        return 4e9 if backward else 2e9  # FLOP/s

    monkeypatch.setattr(floor, "best_gemm_rate", fake_rate)
    shape = floor.ModelShape("m", num_parameters=1_000_000, hidden_size=8, intermediate_size=16, num_layers=1,
                             num_heads=2, num_kv_heads=1, vocab_size=10)
    work = floor.StepWork(prompts=2, generations=3, prompt_tokens=10, completion_tokens=30)
    cache: dict = {}
    rows = floor.step_floor(shape, work, ["fp32"], cache=cache)
    # forward phases: 2e6 · (10 + 30 + 60) / 2e9 = 0.1 s; training: 6e6 · 60 / 4e9 = 0.09 s.
    assert floor.floor_seconds(rows) == pytest.approx(0.19)
    assert [r.seconds["fp32"] for r in rows] == pytest.approx([0.01, 0.03, 0.06, 0.09])
    assert len(calls) == 4
    # Another token count reuses the measured rates: no new GEMM timing.
    floor.step_floor(shape, floor.StepWork(2, 3, 10, 60), ["fp32"], cache=cache)
    assert len(calls) == 4


def test_linear_shapes_cover_every_parameter_once(tmp_path):
    """2N per token is only right if N is exactly the matmul weights plus the few vector parameters."""
    from zerorl.lm.models import build_tiny_model

    path = build_tiny_model(tmp_path / "m", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                            intermediate_size=48, charset="0123456789+-=?\n")
    shape = floor.ModelShape.from_model_dir(path)
    matmul = sum(fan_in * fan_out * count for fan_in, fan_out, count in shape.linear_shapes())
    biases = shape.num_layers * (shape.hidden_size + 2 * shape.kv_size)  # Qwen2: q, k, v have biases
    norms = (2 * shape.num_layers + 1) * shape.hidden_size
    assert shape.vocab_size == 17 and shape.kv_size == 16
    assert shape.num_parameters == matmul + biases + norms


def test_gemm_rate_is_a_positive_rate(monkeypatch):
    shape = floor.ModelShape("m", 0, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                             num_kv_heads=1, vocab_size=8)
    rate = floor.gemm_rate(shape, rows=8, dtype=torch.float32, backward=True, repeats=1)
    # Loose bounds: tiny matmuls on a loaded shared machine can be very slow, but never free or negative.
    assert 1e3 < rate < 1e14
    # best_gemm_rate takes the better of N threads and 1 thread, and leaves the thread count as it was.
    seen = []
    monkeypatch.setattr(floor, "gemm_rate", lambda *a, **k: seen.append(torch.get_num_threads()) or 10.0 * seen[-1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert floor.best_gemm_rate(shape, 8, torch.float32, False) == 20.0
        assert seen == [1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name, target", [("qwen2-1.0m", 1.0e6), ("qwen2-31.5m", 31.5e6)])
def test_benchmark_models_match_the_issue(name, target):
    from transformers import AutoModelForCausalLM, Qwen2Config

    spec = vs_trl.MODELS[name]
    vocab = len(vs_trl.BENCH_CHARSET) + 2  # + <pad>, <|endoftext|>
    assert vocab == 83
    config = Qwen2Config(vocab_size=vocab, hidden_size=spec["hidden_size"], num_hidden_layers=spec["num_layers"],
                         num_attention_heads=spec["num_heads"], num_key_value_heads=spec["num_kv_heads"],
                         intermediate_size=spec["intermediate_size"], tie_word_embeddings=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(target, rel=0.005)


def test_summary_drops_the_warm_up_step():
    result = vs_trl._summary("x", step_seconds=[10.0, 1.0, 2.0], tokens=[100, 10, 30], peak_rss_mb=5.0)
    assert result["seconds_per_step"] == pytest.approx(1.5)
    assert result["tokens_per_second"] == pytest.approx(40 / 3)
    with pytest.raises(RuntimeError, match="2 step times and 3 token counts"):
        vs_trl._summary("x", step_seconds=[1.0, 2.0], tokens=[1, 2, 3], peak_rss_mb=1.0)


def test_both_sides_get_the_environments_openmp_wait_policy(monkeypatch):
    # A forced PASSIVE slowed TRL's 2-thread ops 1.3–1.8× and not zerorl's single-threaded workers (session 8):
    # the children get exactly the environment's policy, none when it has none.
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    env = vs_trl._child_env(2)
    assert "OMP_WAIT_POLICY" not in env
    assert (env["OMP_NUM_THREADS"], env["MKL_NUM_THREADS"]) == ("2", "2")
    assert vs_trl.wait_policy().startswith("unset")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert vs_trl._child_env(2)["OMP_WAIT_POLICY"] == "PASSIVE"
    assert vs_trl.wait_policy() == "PASSIVE"


def test_ratios_use_trl_at_its_best():
    def run(seconds, tokens, rss):
        return {"step_seconds": seconds, "completion_tokens": tokens, "peak_rss_mb": rss}

    stats = {
        "trl-ckpt-on": vs_trl.aggregate([run([2.0, 2.0], [2000, 2000], 600.0)]),  # 1000 tok/s, leanest
        "trl-ckpt-off": vs_trl.aggregate([run([1.0, 1.0], [1200, 1200], 700.0)]),  # 1200 tok/s, fastest
        "zerorl": vs_trl.aggregate([run([0.5], [1800], 400.0), run([0.5], [1800], 420.0)]),  # 3600 tok/s
    }
    assert stats["zerorl"]["tokens_per_second"] == pytest.approx(3600)
    assert (stats["zerorl"]["rss_min"], stats["zerorl"]["rss_max"]) == (400.0, 420.0)
    table = vs_trl.format_model_table("qwen2-1.0m", stats, {"trl-ckpt-on": 0.5, "trl-ckpt-off": 0.5, "zerorl": 0.25})
    assert "= 3.00×** (vs trl-ckpt-off" in table
    assert "= 0.70** (vs trl-ckpt-on" in table
    assert "| zerorl | 2 × 1 | 0.500 (0.500–0.500) | 1800 | 3,600 | 400–420 | 50.0% |" in table

    stats["zerorl-lean"] = vs_trl.aggregate([run([1.0], [1200], 300.0)])  # the memory setting, reported beside
    table = vs_trl.format_model_table("qwen2-1.0m", stats, None)
    assert "zerorl-lean (cpu_workers=1 micro_batch_size=8): peak RSS / TRL-leanest = 0.50** (target ≤ 0.70); " \
        "completion tokens/s / TRL-best = 1.00×" in table
    assert vs_trl.ZERORL_EXTRA["zerorl-lean"] == ("cpu_workers=1", "micro_batch_size=8")


def test_step_ab_pools_the_timed_steps_of_each_side_and_divides_new_by_base():
    import step_ab

    base_runs = [{"step_seconds": [1.0, 3.0], "time/generate": [0.5, 0.5], "time/train": [0.4, 2.0],
                  "completion_tokens": [100, 100], "peak_rss_mb": 500.0},
                 {"step_seconds": [2.0], "time/generate": [1.0], "time/train": [1.0],
                  "completion_tokens": [100], "peak_rss_mb": 700.0}]
    base = step_ab.describe(base_runs)
    assert base == {"s/step": 2.0, "rollout s": 2.0 / 3, "training s": 3.4 / 3, "tokens/s": 50.0,
                    "peak RSS MB": 700.0}
    new = dict(base, **{"s/step": 1.5, "peak RSS MB": 350.0})
    table = step_ab.format_table("m", base, new, "abc1234", rounds=2).splitlines()
    assert table[2].startswith("| base abc1234 | 2.000 |")
    assert table[4] == "| this tree / base | 0.750 | 1.000 | 1.000 | 1.000 | 0.500 |"


def test_gpu_engines_mfu_arithmetic():
    """Training-phase FLOPs = (2·M reference + 6·M training) per token over prompt (once per group) plus
    completion tokens; MFU = that rate over the peak."""
    import gpu_engines

    result = {"completion_tokens": [100, 300], "time/generate": [1.0, 3.0], "time/train": [2.0, 2.0],
              "step_seconds": [3.0, 5.0]}
    # forward FLOPs per token 2·M = 10 → M = 5; tokens = 50 prompt + mean 200 completion = 250;
    # phase FLOPs = 8 · 5 · 250 = 10,000 over 2 s = 5,000 FLOP/s.
    s = gpu_engines.summarize(result, flops_per_token=10.0, prompt_tokens=50, peak=10_000.0, nominal=20_000.0)
    assert s["rollout_tokens_per_s"] == pytest.approx(200 / 2.0)
    assert s["train_tflops"] == pytest.approx(5_000 / 1e12)
    assert s["mfu_measured"] == pytest.approx(0.5) and s["mfu_nominal"] == pytest.approx(0.25)
    assert gpu_engines.summarize(result, 10.0, 50, 10_000.0, None)["mfu_nominal"] is None
    row = gpu_engines.format_table("m", {"e": gpu_engines.summarize(dict(result, peak_cuda_mb=1536.4), 10.0, 50,
                                                                     10_000.0, 20_000.0)}).splitlines()[2]
    assert row == "| e | 100 | 2.000 | 2.000 | 0.0 | 50.0% | 25.0% | 4.000 | 1,536 MB |"


def test_gpu_engines_smoke_runs_the_real_trainer_on_the_cpu(tmp_path, monkeypatch, capsys):
    """--smoke: a tiny padded-vocabulary Qwen2 through `zerorl train` with the in-process engine; vLLM is
    reported as not run where it does not import (as here)."""
    import json

    import gpu_engines

    monkeypatch.setattr(vs_trl, "WORK_DIR", tmp_path)
    out = tmp_path / "gpu.json"
    assert gpu_engines.main(["--smoke", "--no-append", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    zerorl = data["summaries"]["zerorl engine"]
    assert zerorl["completion_tokens"] > 0 and zerorl["rollout_tokens_per_s"] > 0 and 0 < zerorl["mfu_measured"] < 1
    assert zerorl["peak_cuda_mb"] is None  # a CPU run: no GPU memory figure
    printed = capsys.readouterr().out
    assert "| zerorl engine |" in printed and printed.count("| – |") >= 1
    if gpu_engines.vllm_available() is not None:
        assert "| vLLM engine | not run: vLLM does not import here" in printed


def test_gpu_engines_refuses_a_missing_gpu_and_reports_a_failed_run(tmp_path, monkeypatch, capsys):
    import gpu_engines

    monkeypatch.setattr(vs_trl, "WORK_DIR", tmp_path)
    if not torch.cuda.is_available():
        assert gpu_engines.main(["--smoke", "--device", "cuda", "--no-append"]) == 2
        assert "no CUDA device here" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_engines.main(["--device", "cpu"])  # --device only picks the smoke run's device

    def failing_run(model_dir, settings, use_vllm):
        raise RuntimeError("zerorl train failed; log tail:\nRuntimeError: Expected all tensors to be on the same device")

    monkeypatch.setattr(gpu_engines, "run_engine", failing_run)
    assert gpu_engines.main(["--smoke", "--no-append"]) == 1  # a failed run is a failed benchmark, not a clean exit
    captured = capsys.readouterr()
    assert "| zerorl engine | not run: the run failed (RuntimeError: Expected all tensors" in captured.out
    assert "zerorl engine: the run failed" in captured.err
