"""zerorl on a GPU: rollout throughput of the in-process engine and of vLLM, and the training phase's MFU.

    python benchmarks/gpu_engines.py                 # a CUDA GPU: a 0.5B-class Qwen2 (random init), bf16
    python benchmarks/gpu_engines.py --smoke         # any machine: a tiny model on the CPU (checks the script)
    python benchmarks/gpu_engines.py --smoke --device cuda --no-append   # a GPU, in a minute: the tiny model, bf16,
                                                     # the same CUDA path as the full run (run it first)

Issue 7's GPU item. The model has Qwen2-0.5B's shapes (hidden 896, 24 layers, 14 query / 2 key-value heads,
MLP 4,864, a tied 151,936-token vocabulary) with random weights, built here (nothing is downloaded), and a local
byte-level BPE tokenizer padded with filler tokens to that vocabulary, so that every sampled id decodes to text.

For each engine — `use_vllm=false` (zerorl's in-process decode: static KV cache, finished rows leave the batch)
and `use_vllm=true` (vLLM, when it is installed; weights synced after every optimizer step) — it runs
`zerorl train --task arithmetic` for a few steps in a fresh process (the first step not timed) and reads the
run's metrics.jsonl:
  * rollout tokens/s = completion tokens / time/generate;
  * the training phase's model FLOPs over time/train: reference forward 2·M + training 6·M per token, M = the
    multiply-adds of the matrix weights one token passes through (LM head included, attention scores not), over
    the tokens zerorl computes (each prompt once per group) — as a fraction of this device's measured bf16
    matrix-multiply rate (an 8192³ product) and, for the GPUs listed in NOMINAL_BF16_PEAK, of the nominal dense
    bf16 peak: the MFU.
Results: a table on stdout, appended to benchmarks/RESULTS.md (unless --no-append), and with --json the raw
numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

import vs_trl  # noqa: E402
from floor import ModelShape, arithmetic_work, time_matmul  # noqa: E402

# Dense bf16 tensor-core peaks from the vendors' datasheets (no sparsity), FLOP/s.
NOMINAL_BF16_PEAK = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12}

QWEN2_05B_SHAPES = dict(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864,
                        pad_vocab_to=151_936, max_position_embeddings=4096)
SMOKE_SHAPES = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                    pad_vocab_to=1024, max_position_embeddings=256)


@dataclass(frozen=True)
class Settings:
    device: str = "cuda"
    prompts: int = 16
    generations: int = 8
    completion_length: int = 256
    steps: int = 4  # 1 warm-up + 3 timed
    threads: int = 8
    bf16: bool = True
    matmul_size: int = 8192


SMOKE = Settings(device="cpu", prompts=2, generations=2, completion_length=8, steps=2, threads=2, bf16=False,
                 matmul_size=512)


def build_model(path: Path, shapes: dict) -> Path:
    """The benchmark model directory (random init, seed 0), unless it exists."""
    if (path / "config.json").exists():
        return path
    from zerorl.lm.models import build_tiny_model

    return build_tiny_model(path, arch="qwen2", tokenizer="bpe", bpe_vocab_size=512, seed=0, **shapes)


def matmul_rate(settings: Settings) -> float:
    """FLOP/s of one n³ matrix product on the device (bf16 on a GPU, float32 on a CPU)."""
    import torch

    dtype = torch.bfloat16 if settings.bf16 else torch.float32
    n = settings.matmul_size
    a = torch.randn(n, n, device=settings.device, dtype=dtype)
    b = torch.randn(n, n, device=settings.device, dtype=dtype)
    if settings.device.startswith("cuda"):
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            a @ b
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / 10
    else:
        seconds = time_matmul(a, b)
    return 2 * n ** 3 / seconds


def run_engine(model_dir: Path, settings: Settings, use_vllm: bool) -> dict:
    """`zerorl train` with one engine, in a fresh process (vs_trl.run_zerorl, the device and engine as extra
    overrides): per timed step the completion tokens, the rollout and training phases and the step time."""
    tag = f"gpu-{'vllm' if use_vllm else 'zerorl'}-{settings.device}"
    return vs_trl.run_zerorl(
        model_dir, steps=settings.steps, threads=settings.threads, prompts=settings.prompts,
        generations=settings.generations, completion_length=settings.completion_length, beta=0.04,
        learning_rate=1e-6, tag=tag,
        extra=(f"device={settings.device}", f"bf16={str(settings.bf16).lower()}", f"use_vllm={str(use_vllm).lower()}"),
        preload=vs_trl.allocator_library("auto"))  # the host's malloc, as the zerorl command picks it


def vllm_available() -> str | None:
    """None when vLLM imports here, else why not."""
    try:
        import vllm  # noqa: F401
    except Exception as error:  # noqa: BLE001  (ImportError, or a CUDA/torch mismatch raised at import)
        return f"{type(error).__name__}: {error}"
    return None


def summarize(result: dict, flops_per_token: float, prompt_tokens: int, peak: float, nominal: float | None) -> dict:
    completion = statistics.mean(result["completion_tokens"])
    generate, train = statistics.mean(result["time/generate"]), statistics.mean(result["time/train"])
    phase_flops = 8 * flops_per_token / 2 * (prompt_tokens + completion)  # 2·M reference + 6·M training
    rate = phase_flops / train
    return {"completion_tokens": completion, "rollout_tokens_per_s": completion / generate, "rollout_s": generate,
            "train_s": train, "step_s": statistics.mean(result["step_seconds"]), "train_tflops": rate / 1e12,
            "mfu_measured": rate / peak, "mfu_nominal": rate / nominal if nominal else None,
            "peak_cuda_mb": result.get("peak_cuda_mb")}


def format_table(name: str, summaries: dict[str, dict | str]) -> str:
    lines = [f"| {name} | rollout tokens/s | rollout s/step | training phase s/step | training TFLOP/s | "
             "MFU vs measured matmul | MFU vs nominal peak | s/step | peak GPU memory (zerorl's process) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for engine, s in summaries.items():
        if isinstance(s, str):
            lines.append(f"| {engine} | not run: {s} | | | | | | | |")
            continue
        nominal = f"{100 * s['mfu_nominal']:.1f}%" if s["mfu_nominal"] is not None else "–"
        memory = f"{s['peak_cuda_mb']:,.0f} MB" if s.get("peak_cuda_mb") is not None else "–"
        lines.append(f"| {engine} | {s['rollout_tokens_per_s']:,.0f} | {s['rollout_s']:.3f} | {s['train_s']:.3f} | "
                     f"{s['train_tflops']:.1f} | {100 * s['mfu_measured']:.1f}% | {nominal} | {s['step_s']:.3f} | "
                     f"{memory} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU: checks the script anywhere")
    parser.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="with --smoke: the tiny model on this device (cuda: under bf16, as the full run)")
    args = parser.parse_args(argv)
    settings, shapes = (SMOKE, SMOKE_SHAPES) if args.smoke else (Settings(), QWEN2_05B_SHAPES)
    if args.device is not None:
        if not args.smoke:
            parser.error("--device goes with --smoke (the full run is on cuda)")
        settings = replace(settings, device=args.device, bf16=args.device == "cuda")

    import torch

    if settings.device == "cuda" and not torch.cuda.is_available():
        print("gpu_engines.py: no CUDA device here. Run it on a machine with an NVIDIA GPU, or with --smoke to "
              "check the script on the CPU.", file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name() if settings.device == "cuda" else "CPU"
    model_dir = build_model(vs_trl.WORK_DIR / "models" / ("qwen2-smoke-padded" if args.smoke else "qwen2-0.5b-class"), shapes)
    shape = ModelShape.from_model_dir(model_dir)
    flops_per_token = 2 * sum(i * o * count for i, o, count in shape.linear_shapes())  # forward, 2·M

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_tokens = arithmetic_work(tokenizer, settings.prompts, settings.generations, steps=settings.steps,
                                    template="compact", prompt_shared=True).prompt_tokens
    peak = matmul_rate(settings)
    nominal = next((value for key, value in NOMINAL_BF16_PEAK.items() if key in device_name), None) \
        if settings.bf16 else None

    raw, summaries, failed = {}, {}, []
    for engine, use_vllm in (("zerorl engine", False), ("vLLM engine", True)):
        missing = vllm_available() if use_vllm else None
        if missing is not None:
            summaries[engine] = f"vLLM does not import here ({missing[:120]}); pip install 'zerorl[vllm]'"
            continue
        try:
            raw[engine] = run_engine(model_dir, settings, use_vllm)
        except RuntimeError as error:  # the run's log tail is in the message: report it, go on to the next engine
            print(error, file=sys.stderr)
            last = [line for line in str(error).splitlines() if line.strip()][-1]
            summaries[engine] = f"the run failed ({last[:160]})"
            failed.append(engine)
            continue
        summaries[engine] = summarize(raw[engine], flops_per_token, prompt_tokens, peak, nominal)

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    precision = "bf16 autocast over float32 weights" if settings.bf16 else "float32"
    header = (f"## zerorl on a GPU: engines and training MFU (benchmarks/gpu_engines.py{' --smoke' if args.smoke else ''}, "
              f"{stamp})\n\n{device_name}; {shape.name}: {shape.num_parameters / 1e6:.1f}M parameters, M = "
              f"{flops_per_token / 2 / 1e6:.1f}M matrix multiply-adds per token; {precision}; "
              f"{settings.prompts} prompts × G = {settings.generations}, {settings.completion_length} new tokens, "
              f"β = 0.04, μ = 1; {settings.steps} steps per engine, the first not timed; measured matrix-multiply "
              f"rate {peak / 1e12:.1f} TFLOP/s ({settings.matmul_size}³)"
              + (f", nominal dense bf16 peak {nominal / 1e12:.0f} TFLOP/s" if nominal else "") + ".\n")
    table = format_table(shape.name, summaries)
    print(header + "\n" + table)
    if args.json:
        args.json.write_text(json.dumps({"device": device_name, "peak": peak, "nominal": nominal, "raw": raw,
                                         "summaries": summaries}, indent=2))
    if not args.no_append:
        with vs_trl.RESULTS.open("a") as handle:
            handle.write("\n" + header + "\n" + table + "\n")
        print(f"appended to {vs_trl.RESULTS}")
    if failed:
        print(f"gpu_engines.py: {', '.join(failed)}: the run failed (its log tail is above).", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
