"""This machine's arithmetic limit for one GRPO step: the FLOPs a step must do, divided by the rate at
which this CPU multiplies matrices of the model's shapes.

    python benchmarks/floor.py                       # both benchmark models, fp32 + bf16, 2 threads
    python benchmarks/floor.py --model DIR --append  # any HF model directory; append to RESULTS.md

FLOPs of one step (N = parameter count, tied embeddings counted once, as the LM head):

    generation   2N · (Σ prompt tokens of the P unique prompts  +  B · Lc generated tokens)
    reference    2N · B · (Lp + Lc)          (only when β > 0)
    training     6N · B · (Lp + Lc)          (forward 2N + backward 4N)

with B = P · G completions and Lp, Lc the real (unpadded) prompt and completion tokens of a step:
padding is work a step can avoid, so it is not part of the floor. Completion tokens are the ones a
run actually produced (a random-init model with an 83-token vocabulary ends ~1/3 of its completions
with EOS before max_completion_length). Each prompt is prefilled once, as zerorl's engine does.
Left out (reported, not counted): attention scores (4 · layers · context · hidden per token), norms, the embedding lookup and the optimizer.

GEMM rate: torch.matmul on exactly the model's linear shapes (q, k, v, o, gate, up, down, LM head) at
the row count M of each phase — decode M = B (one new token per row), prefill M = prompt tokens,
reference and training M = B · (Lp + Lc) — forward only for generation and reference, forward plus
both backward products (dX = dY·W, dW = dYᵀ·X) for training. The rate of a phase is its FLOPs over the
summed best-of-repeats times, so the floor is the best this machine showed, not an average.

Each rate is the better of the run's thread count and 1 thread (tiny matmuls can lose more to waking a
second thread than they gain). The floor is the sum over phases of FLOPs / rate. "Fraction of the floor" = floor seconds / measured
seconds per step: 1.0 would mean every cycle of the step was a GEMM at full speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

# OMP_WAIT_POLICY is this environment's (by default none: libgomp spins briefly, then sleeps), as for
# vs_trl.py's runs. OpenMP threads that spin while waiting can collapse when the cores are shared with other
# work: on this 2-core machine at load ~4.7, 2-thread GEMMs of the 1.0M model's shapes once ran at 0.2 GFLOP/s
# spinning and 33 GFLOP/s with OMP_WAIT_POLICY=PASSIVE. On such a machine set PASSIVE in the environment.
import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS = BENCH_DIR / "RESULTS.md"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count and the GEMM shapes need from a causal LM's config."""

    name: str
    num_parameters: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int

    @property
    def kv_size(self) -> int:
        return self.hidden_size // self.num_heads * self.num_kv_heads

    def linear_shapes(self) -> list[tuple[int, int, int]]:
        """(in, out, count) of every matmul weight a token passes through (one set per layer + LM head)."""
        h, i, kv, layers = self.hidden_size, self.intermediate_size, self.kv_size, self.num_layers
        return [(h, h, 2 * layers),  # q, o
                (h, kv, 2 * layers),  # k, v
                (h, i, 2 * layers),  # gate, up
                (i, h, layers),  # down
                (h, self.vocab_size, 1)]  # LM head

    @classmethod
    def from_model_dir(cls, path: str | Path) -> ModelShape:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return cls(name=Path(path).name, num_parameters=sum(p.numel() for p in model.parameters()),
                   hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                   num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
                   num_kv_heads=getattr(config, "num_key_value_heads", config.num_attention_heads),
                   vocab_size=config.vocab_size)


@dataclass(frozen=True)
class StepWork:
    """Token counts of one GRPO step: P prompts of `prompt_tokens` real tokens in all, G samples each,
    `completion_tokens` generated tokens in all (at most P · G · max_completion_length)."""

    prompts: int
    generations: int
    prompt_tokens: int  # Σ over the P unique prompts
    completion_tokens: int  # Σ over the B = P · G completions
    with_reference: bool = True
    prompt_shared: bool = False  # each prompt encoded once per group in the reference/training passes (zerorl)

    @property
    def completions(self) -> int:
        return self.prompts * self.generations

    @property
    def sequence_tokens(self) -> int:
        """Tokens one forward over the batch computes: Σ over the B completions of (prompt + completion)
        tokens, or with prompt_shared each prompt once plus the completions (zerorl.lm.native)."""
        if self.prompt_shared:
            return self.prompt_tokens + self.completion_tokens
        return self.generations * self.prompt_tokens + self.completion_tokens

    def phases(self) -> list[tuple[str, int, float, int]]:
        """(phase, tokens, FLOPs per token per parameter, GEMM row count M)."""
        rows = [("generation: prefill", self.prompt_tokens, 2.0, self.prompt_tokens),
                ("generation: decode", self.completion_tokens, 2.0, self.completions)]
        if self.with_reference:
            rows.append(("reference forward", self.sequence_tokens, 2.0, self.sequence_tokens))
        rows.append(("training fwd+bwd", self.sequence_tokens, 6.0, self.sequence_tokens))
        return rows


def time_matmul(a: torch.Tensor, b: torch.Tensor, repeats: int = 5, min_seconds: float = 0.05) -> float:
    """Best-of-`repeats` seconds of one `a @ b`; each repeat loops until it has run `min_seconds`."""
    torch.matmul(a, b)  # warm-up: first call allocates and picks a kernel
    best = float("inf")
    for _ in range(repeats):
        loops, start = 0, time.perf_counter()
        while True:
            torch.matmul(a, b)
            loops += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        best = min(best, elapsed / loops)
    return best


def gemm_rate(shape: ModelShape, rows: int, dtype: torch.dtype, backward: bool, repeats: int = 5) -> float:
    """FLOP/s of the model's matmuls at `rows` tokens: forward x·Wᵀ, and with `backward` also dY·W and dYᵀ·X.

    Each distinct weight shape is timed once and weighted by how often a token meets it.
    """
    generator = torch.Generator().manual_seed(0)
    flops = seconds = 0.0
    for fan_in, fan_out, count in shape.linear_shapes():
        x = torch.randn(rows, fan_in, generator=generator).to(dtype)
        weight = torch.randn(fan_out, fan_in, generator=generator).to(dtype)
        products = [(x, weight.t())]  # forward, as nn.Linear computes it
        if backward:
            grad_out = torch.randn(rows, fan_out, generator=generator).to(dtype)
            products += [(grad_out, weight), (grad_out.t(), x)]  # dX = dY·W, dW = dYᵀ·X
        for left, right in products:
            flops += count * 2.0 * left.shape[0] * left.shape[1] * right.shape[1]
            seconds += count * time_matmul(left, right, repeats=repeats)
    return flops / seconds


def best_gemm_rate(shape: ModelShape, rows: int, dtype: torch.dtype, backward: bool, repeats: int = 5) -> float:
    """The better of `gemm_rate` at the current thread count and at 1 thread: small matmuls can lose more to
    waking a second thread than they gain, and a step could run them on one; a floor takes the best."""
    threads = torch.get_num_threads()
    rates = []
    try:
        for count in sorted({1, threads}):
            torch.set_num_threads(count)
            rates.append(gemm_rate(shape, rows, dtype, backward, repeats=repeats))
    finally:
        torch.set_num_threads(threads)
    return max(rates)


def attention_flops_per_token(shape: ModelShape, context: float) -> float:
    """QKᵀ and softmax·V: 2 · 2 · layers · context · hidden (not in the 2N/6N count)."""
    return 4.0 * shape.num_layers * context * shape.hidden_size


@dataclass
class FloorRow:
    phase: str
    tokens: int
    gflop: float
    rows: int
    rate: dict[str, float]  # dtype → GFLOP/s
    seconds: dict[str, float]  # dtype → floor seconds


def step_floor(shape: ModelShape, work: StepWork, dtypes: list[str], repeats: int = 5,
               cache: dict | None = None) -> list[FloorRow]:
    """Floor seconds of each phase of one step, per dtype. Pass the same `cache` to reuse the measured
    rates of each (phase, dtype) for another token count of the same model."""
    out = []
    cache = {} if cache is None else cache
    for phase, tokens, flops_per_param, rows in work.phases():
        flops = flops_per_param * shape.num_parameters * tokens
        backward = flops_per_param > 2.0
        rate, seconds = {}, {}
        for name in dtypes:
            key = (phase, name)
            if key not in cache:
                cache[key] = best_gemm_rate(shape, rows, DTYPES[name], backward, repeats=repeats)
            rate[name] = cache[key] / 1e9
            seconds[name] = flops / cache[key]
        out.append(FloorRow(phase, tokens, flops / 1e9, rows, rate, seconds))
    return out


def floor_seconds(rows: list[FloorRow], dtype: str = "fp32") -> float:
    return sum(row.seconds[dtype] for row in rows)


def arithmetic_work(tokenizer, prompts: int = 8, generations: int = 8, completion_tokens: float | None = None,
                    completion_length: int = 32, steps: int = 6, template: str = "compact",
                    with_reference: bool = True, prompt_shared: bool = False) -> StepWork:
    """Mean prompt tokens of the first `steps` steps of `zerorl train --task arithmetic` (seed 0), with
    `completion_tokens` per step (None: every completion runs to `completion_length`)."""
    sys.path.insert(0, str(REPO_ROOT))
    from zerorl.tasks import ArithmeticTask, format_prompt

    task = ArithmeticTask(seed=0)
    texts = [format_prompt(task.train_row(i), template) for i in range(prompts * steps)]
    total = sum(len(ids) for ids in tokenizer(texts)["input_ids"])
    if completion_tokens is None:
        completion_tokens = prompts * generations * completion_length
    return StepWork(prompts, generations, round(total / steps), round(completion_tokens), with_reference,
                    prompt_shared)


def format_table(shape: ModelShape, work: StepWork, rows: list[FloorRow], dtypes: list[str],
                 measured: dict[str, float] | None = None) -> str:
    """Markdown table; `measured` maps a system name to its s/step (fp32) for the fraction column."""
    head = "| phase | tokens | GEMM rows M | GFLOP | " + " | ".join(
        f"{d} GFLOP/s | {d} floor s" for d in dtypes) + " |"
    lines = [head, "|" + "---|" * (4 + 2 * len(dtypes))]
    for row in rows:
        cells = " | ".join(f"{row.rate[d]:.1f} | {row.seconds[d]:.4f}" for d in dtypes)
        lines.append(f"| {row.phase} | {row.tokens} | {row.rows} | {row.gflop:.2f} | {cells} |")
    total_gflop = sum(r.gflop for r in rows)
    cells = " | ".join(f"{total_gflop / floor_seconds(rows, d):.1f} | **{floor_seconds(rows, d):.3f}**"
                       for d in dtypes)
    lines.append(f"| **step** | | | {total_gflop:.2f} | {cells} |")
    context = work.prompt_tokens / work.prompts + work.completion_tokens / work.completions / 2
    attention = attention_flops_per_token(shape, context) / (2.0 * shape.num_parameters)
    notes = [f"N = {shape.num_parameters:,} parameters (hidden {shape.hidden_size}, {shape.num_layers} layers, "
             f"{shape.num_heads}/{shape.num_kv_heads} heads, MLP {shape.intermediate_size}, vocab "
             f"{shape.vocab_size}); P = {work.prompts} prompts × G = {work.generations}, "
             f"{work.prompt_tokens} prompt and {work.completion_tokens} completion tokens per step.",
             f"Attention scores, not counted: ≈ {100 * attention:.1f}% of 2N per token at mean context "
             f"{context:.0f}."]
    if measured:
        fp32 = floor_seconds(rows, "fp32")
        notes.append("Fraction of the fp32 floor (floor s / measured s per step): " + ", ".join(
            f"{name} {fp32 / seconds:.1%} ({seconds:.3f} s/step)" for name, seconds in measured.items()))
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes)


def machine_line(threads: int) -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} torch "
            f"threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, load average {load} (1/5/15 min; "
            "other work shares this machine)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="HF model directory (repeatable); default: the two "
                        "vs_trl.py models, built under benchmarks/_work/models if missing")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--completion-length", type=int, default=32)
    parser.add_argument("--no-reference", action="store_true", help="β = 0: no reference forward")
    parser.add_argument("--repeats", type=int, default=5, help="best-of repeats per GEMM timing")
    parser.add_argument("--zerorl-steps", type=int, default=3,
                        help="timed `zerorl train` steps (after 1 warm-up) for the fraction; 0 = skip")
    parser.add_argument("--append", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    sys.path.insert(0, str(BENCH_DIR))
    import vs_trl  # the benchmark models and the `zerorl train` runner live there

    model_dirs = [Path(p) for p in args.model] if args.model else list(vs_trl.build_models().values())
    sections = []
    for model_dir in model_dirs:
        shape = ModelShape.from_model_dir(model_dir)
        measured, completion_tokens = None, None
        if args.zerorl_steps > 0:  # first, so that the floor counts the tokens this run produced
            run = vs_trl.run_zerorl(model_dir, steps=1 + args.zerorl_steps, threads=args.threads,
                                    prompts=args.prompts, generations=args.generations,
                                    completion_length=args.completion_length,
                                    beta=0.0 if args.no_reference else 0.04, tag=f"floor-{model_dir.name}")
            completion_tokens = sum(run["completion_tokens"]) / len(run["completion_tokens"])
            measured = {"zerorl": run["seconds_per_step"]}
        work = arithmetic_work(AutoTokenizer.from_pretrained(model_dir), args.prompts, args.generations,
                               completion_tokens, args.completion_length, with_reference=not args.no_reference)
        rows = step_floor(shape, work, args.dtypes, repeats=args.repeats)
        table = format_table(shape, work, rows, args.dtypes, measured)
        sections.append(f"### {shape.name}\n\n{table}")
        print(sections[-1] + "\n", flush=True)
    if args.append:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        text = (f"\n## FLOP floor of a GRPO step (benchmarks/floor.py, {stamp})\n\n"
                f"`python benchmarks/floor.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
                f"{machine_line(args.threads)}. Floor = Σ phase FLOPs / GEMM rate at that phase's shapes "
                "(best of repeats). FLOPs: generation 2N per prompt token (once per unique prompt) and per "
                "generated token, reference 2N and training 6N per prompt+completion token.\n\n"
                + "\n\n".join(sections) + "\n")
        with RESULTS.open("a") as handle:
            handle.write(text)
        print(f"appended to {RESULTS}")
    print(json.dumps({"machine": machine_line(args.threads)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
