"""Reliability benchmark (issue 5): random SIGKILLs and exact resume, a checkpoint corruption scan, and
adversarial inputs against every built-in verifier.

    OMP_NUM_THREADS=1 python benchmarks/reliability.py [--kills 30] [--fuzz 10000] [--seed 0] [--no-append]

1. Kills. A reference GRPO run (tiny random Qwen2, μ=2 passes × 2 minibatches, KL to a reference model,
   cosine schedule, eval before/after, a user reward function in a worker process) runs uninterrupted.
   Then each trial starts the same run and SIGKILLs it at a random moment: a random delay over the whole
   life of the process (start-up, evaluation, training, checkpoint writes, the final save), or mid-step k,
   or in the middle of a checkpoint write; some trials also kill the resumed process. The run is then
   finished with ``zerorl train --output-dir DIR --resume`` and its final weights compared, bit for bit,
   with the reference. A kill before the run wrote its config.yaml leaves nothing to resume: such a run is
   started again (counted separately).
2. Corruption scan. After every kill, every directory named like a checkpoint is loaded in full
   (manifest sizes, every tensor file, the trainer state); a failure counts as corrupt.
3. Verifiers. Seeded generators of adversarial completions (huge exponents, deep nesting, unicode,
   megabyte strings, tags inside tags, code-injection canaries, fragment soup, numeric edge cases) are fed
   to format_reward, integer_accuracy, math_accuracy and countdown_accuracy. Counted: crashes (any
   exception), scores outside {0, 1}, calls over 1 s, code executed (eval/exec/compile trapped while our own
   verifiers run; for math-verify, whose plain-expression path hands text to sympy's parse_expr, any text
   other than digits and operators reaching parse_expr; and canary files that the payloads would create).
"""

from __future__ import annotations

import argparse
import ast
import builtins
import contextlib
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MAX_STEPS = 30
REWARD_FILE = '''
def accuracy(prompts, completions, **kwargs):
    """Fraction of digits: dense, different for every completion, so every step moves the weights."""
    return [sum(ch.isdigit() for ch in text) / max(1, len(text)) for text in completions]
'''


# ================================================================================================
# 1 + 2. Kills, exact resume, corruption scan
# ================================================================================================

def train_command(root: Path, out: Path, resume: bool = False) -> list[str]:
    base = [sys.executable, "-m", "zerorl.cli", "train", "--output-dir", str(out)]
    if resume:
        return base + ["--resume"]
    return base + [
        "--model", str(root / "tiny"), "--max-steps", str(MAX_STEPS), "template=compact",
        f"reward_funcs=[{root / 'reward.py'}:accuracy, format]", "reward_timeout_s=30",
        "prompts_per_step=4", "num_generations=4", "max_completion_length=12", "num_iterations=2",
        "num_minibatches=2", "micro_batch_size=4", "learning_rate=1e-2", "warmup_steps=3",
        "lr_scheduler_type=cosine", "num_eval=4", "eval_samples_per_prompt=2", "save_steps=3",
        "save_total_limit=2", "num_threads=1", "plots=false", "progress=false",
    ]


def environment(slow_checkpoint: float = 0.0) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if slow_checkpoint:
        env["ZERORL_TEST_SLOW_CHECKPOINT"] = str(slow_checkpoint)
    return env


def metric_lines(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def writing_checkpoint(out: Path, min_files: int) -> bool:
    root = out / "checkpoints"
    if not root.is_dir():
        return False
    return any(len(list(tmp.iterdir())) >= min_files for tmp in root.glob(".tmp-step-*"))


def start_and_kill(command: list[str], env: dict, ready, extra_delay: float = 0.0) -> dict:
    """Run ``command``; once ``ready()`` holds, wait ``extra_delay`` s and SIGKILL it. Returns where it died."""
    start = time.monotonic()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None and not ready(time.monotonic() - start):
        time.sleep(0.002)
    if extra_delay and process.poll() is None:
        time.sleep(extra_delay)
    killed = process.poll() is None
    if killed:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return {"killed": killed, "at_s": time.monotonic() - start}


def scan_checkpoints(out: Path) -> tuple[int, int, list[str]]:
    """Load every directory named like a checkpoint; (scanned, corrupt, problems)."""
    from zerorl.checkpoint import CHECKPOINT_PREFIX, load_checkpoint

    root = out / "checkpoints"
    scanned, corrupt, problems = 0, 0, []
    if not root.is_dir():
        return 0, 0, []
    for path in sorted(root.iterdir()):
        if not path.name.startswith(CHECKPOINT_PREFIX):
            continue  # .tmp-* / .old-* / .del-* are never loaded
        scanned += 1
        try:
            tensors, state = load_checkpoint(path)
            assert {"model", "optimizer", "scheduler", "rng"} <= set(tensors), sorted(tensors)
            assert state["step"] == int(path.name[len(CHECKPOINT_PREFIX):]), state
        except Exception as error:  # noqa: BLE001 - anything at all counts as corrupt
            corrupt += 1
            problems.append(f"{path.name}: {type(error).__name__}: {error}")
    return scanned, corrupt, problems


def same_weights(out: Path, reference: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    got, want = load_file(out / "final" / "model.safetensors"), load_file(reference / "final" / "model.safetensors")
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def kill_benchmark(num_trials: int, seed: int, work: Path) -> dict:
    from safetensors.torch import load_file

    from zerorl.lm.models import build_tiny_model

    build_tiny_model(work / "tiny", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, seed=11)
    (work / "reward.py").write_text(REWARD_FILE)
    reference = work / "reference"
    start = time.monotonic()
    subprocess.run(train_command(work, reference), env=environment(), check=True, capture_output=True)
    reference_seconds = time.monotonic() - start
    initial = load_file(work / "tiny" / "model.safetensors")
    final = load_file(reference / "final" / "model.safetensors")
    moved = sum(not (initial[k] == final[k]).all().item() for k in initial)
    print(f"reference run: {reference_seconds:.1f} s, {moved}/{len(initial)} tensors moved", flush=True)

    rng = random.Random(seed)
    tally = {"tried": 0, "survived": 0, "restarted": 0, "not_killed": 0, "scanned": 0, "corrupt": 0,
             "by_mode": {}, "problems": [], "trials": []}
    for trial in range(num_trials):
        out = work / f"trial-{trial:02d}"
        mode = rng.choice(["delay", "delay", "step", "checkpoint"])
        kills = []
        if mode == "delay":  # any moment of the process's life, start-up and the final save included
            delay = rng.uniform(0.0, reference_seconds)
            kills.append(start_and_kill(train_command(work, out), environment(), lambda t, d=delay: t >= d))
        elif mode == "step":  # mid-step k, at a random phase of the step
            k = rng.randint(1, MAX_STEPS - 1)
            kills.append(start_and_kill(train_command(work, out), environment(),
                                        lambda t, k=k, out=out: metric_lines(out) >= k, extra_delay=rng.uniform(0, 0.1)))
        else:  # between the files of a checkpoint being written (slowed to 0.05 s per file)
            files, k = rng.randint(1, 6), rng.randint(0, MAX_STEPS - 3)
            kills.append(start_and_kill(train_command(work, out), environment(slow_checkpoint=0.05),
                                        lambda t, f=files, k=k, out=out: metric_lines(out) >= k
                                        and writing_checkpoint(out, f)))
        if rng.random() < 0.3 and (out / "config.yaml").exists():  # kill the resumed process too
            delay = rng.uniform(0.0, reference_seconds)
            kills.append(start_and_kill(train_command(work, out, resume=True), environment(),
                                        lambda t, d=delay: t >= d))
        for kill in kills:
            tally["tried"] += kill["killed"]
            tally["not_killed"] += not kill["killed"]
        tally["by_mode"][mode] = tally["by_mode"].get(mode, 0) + sum(k["killed"] for k in kills)

        scanned, corrupt, problems = scan_checkpoints(out)
        tally["scanned"] += scanned
        tally["corrupt"] += corrupt
        tally["problems"] += [f"trial {trial}: {p}" for p in problems]

        restarted = not (out / "config.yaml").exists()
        command = train_command(work, out) if restarted else train_command(work, out, resume=True)
        finished = subprocess.run(command, env=environment(), capture_output=True, text=True)
        ok = finished.returncode == 0 and same_weights(out, reference)
        survived_kills = sum(k["killed"] for k in kills) if ok else 0
        tally["survived"] += survived_kills
        tally["restarted"] += restarted
        if not ok:
            tally["problems"].append(f"trial {trial}: rc={finished.returncode} {finished.stderr[-400:]}")
        scanned, corrupt, problems = scan_checkpoints(out)
        tally["scanned"] += scanned
        tally["corrupt"] += corrupt
        tally["problems"] += [f"trial {trial} (after resume): {p}" for p in problems]
        lines = ", ".join(f"{k['at_s']:.2f} s" for k in kills)
        print(f"trial {trial:2d} {mode:10s} killed at {lines:22s} resumed={'fresh' if restarted else 'yes':5s} "
              f"bitwise={'yes' if ok else 'NO'}", flush=True)
        tally["trials"].append({"mode": mode, "kills": kills, "ok": ok})
        shutil.rmtree(out, ignore_errors=True)
    tally["reference_seconds"] = reference_seconds
    return tally


# ================================================================================================
# 3. Verifiers under adversarial input
# ================================================================================================

CANARY = Path(tempfile.gettempdir()) / "zerorl_reliability_canary_must_not_exist"
INJECTIONS = [
    f"__import__('os').system('touch {CANARY}')",
    f"exec(\"open('{CANARY}', 'w').write('x')\")",
    f"eval(\"__import__('os').system('touch {CANARY}')\")",
    f"open('{CANARY}', 'w')",
    "().__class__.__bases__[0].__subclasses__()",
    "lambda: __import__('os')",
    f"$(touch {CANARY})",
    f"`touch {CANARY}`",
    f"\\immediate\\write18{{touch {CANARY}}}",
    "\\input{/etc/passwd}",
    "{{7*7}}",
    "${7*7}",
    "globals()['__builtins__']",
    "Symbol('x').__class__",
]
FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", "<answer><answer>", "</answer></think>",
             "<think <answer", "(", ")", "((((", "))))", "+", "-", "*", "**", "/", "^", "!", "x", "\u00d7",
             "\u00f7", "\u2212", "9" * 12, "0", "1", "3", "7", "10^{10^{10}}", "2**99999999", "9^9^9^9",
             "1e999", "\\frac{1}{0}", "\\sqrt{", "\\boxed{", "$", "{", "}", "[", "]", ".", ",", " ", "\n",
             "\t", "\u0663", "\U0001f600", "\u202e", "\x00", "NaN", "inf", "-0", "\\left(", "\\right)"]
UNICODE_POOL = ("\u0660\u0661\u0662\u0663\u06f4\u0966\uff11\uff12\uff13\u00b2\u00bd\u2153\u2460\u216b"
                "\u202e\u202d\u200b\u200d\u2060\ufeff\u0301\u0308\u00e9\u00df\u0130\u03a3\u4e00\uac00"
                "\U0001f600\U0001f9e0\U00010000\U0010ffff\ud800\udfff\x00\x7f\x85\u2028\u2029\u1680")


def _wrap(payload: str, rng: random.Random) -> str:
    shape = rng.random()
    if shape < 0.55:
        return f"<think>{rng.choice(['', 'let me see', '<answer>1</answer>'])}</think><answer>{payload}</answer>"
    if shape < 0.7:
        return f"<answer>{payload}</answer>"
    return payload


def family_huge_exponent(rng: random.Random) -> str:
    base, exp = rng.choice(["2", "9", "10", "99", "(10**10)", "x", "1.5", "-7"]), str(rng.randint(10**4, 10**12))
    forms = [f"{base}**{exp}", f"{base}^{exp}", f"${base}^{{{exp}}}$", f"{base}^{{{base}^{{{exp}}}}}",
             f"9^9^9^{exp}", f"1e{exp}", f"\\boxed{{{base}^{{{exp}}}}}", f"{exp}!", f"${exp}!$",
             f"\\frac{{{base}^{{{exp}}}}}{{3}}", f"pow({base},{exp})", f"{base}**{base}**{base}**{exp}",
             f"\\exp({exp})", f"{exp}" * rng.randint(1, 500)]
    return rng.choice(forms)


def family_deep_nesting(rng: random.Random) -> str:
    depth = rng.choice([10, 100, 1000, 10_000, 100_000])
    opener, closer = rng.choice([("(", ")"), ("{", "}"), ("[", "]"), ("\\sqrt{", "}"), ("\\frac{1}{", "}"),
                                 ("<answer>", "</answer>"), ("<think>", "</think>"), ("-(", ")"), ("\\left(", "\\right)")])
    inner = rng.choice(["1", "3+4", "x", "", "2**99999"])
    balanced = rng.random() < 0.7
    return opener * depth + inner + (closer * depth if balanced else closer * rng.randint(0, depth))


def family_unicode(rng: random.Random) -> str:
    return "".join(rng.choice(UNICODE_POOL) if rng.random() < 0.7 else rng.choice("0123456789+-*/()= ")
                   for _ in range(rng.randint(1, 200)))


def family_megabyte(rng: random.Random) -> str:
    piece = rng.choice(["(", "9", "<answer>", "</think>", "1+", "((1))", "\u00d7", " ", "a" * 7, "\\sqrt{",
                        "<think>", "</answer>", "\U0001f600", "x^"])
    text = piece * (1_000_000 // len(piece))
    return f"<think>x</think><answer>{text}</answer>" if rng.random() < 0.5 else text


def family_tags_in_tags(rng: random.Random) -> str:
    tags = ["<think>", "</think>", "<answer>", "</answer>", "<answer >", "</ answer>", "<ANSWER>",
            "<answer\n>", "<think/>", "<answer/>", "&lt;answer&gt;"]
    parts = []
    for _ in range(rng.randint(2, 30)):
        parts.append(rng.choice(tags) if rng.random() < 0.6 else rng.choice(["1", "42", "x", " ", "7*6", "\n"]))
    return "".join(parts)


def family_injection(rng: random.Random) -> str:
    return _wrap(rng.choice(INJECTIONS), rng)


def family_fragments(rng: random.Random) -> str:
    return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 40)))


def family_numbers(rng: random.Random) -> str:
    forms = ["-0", "+5", "\u0663", "1_000", "0x1F", "1e5", "NaN", "inf", "-inf", " 4 \n", "4.0", "04",
             "9" * 100, "9" * 101, "9" * 5000, "1" * 100_000, "- 4", "\u22124", "4\u200b", "\uff14\uff12",
             "42/1", "84/2", "\\frac{84}{2}", "6*7", "1/0", "0/0", "0^0", "\\infty", "-\\infty", "i", "\\pi"]
    return rng.choice(forms)


FAMILIES = {
    "huge exponents": family_huge_exponent, "deep nesting": family_deep_nesting, "unicode": family_unicode,
    "megabyte strings": family_megabyte, "tags inside tags": family_tags_in_tags,
    "code injection": family_injection, "fragment soup": family_fragments, "numeric edge cases": family_numbers,
}
# Megabyte inputs are costly to build; they get a smaller share (still hundreds per verifier).
WEIGHTS = {"megabyte strings": 0.02}


def adversarial_inputs(n: int, seed: int):
    rng = random.Random(seed)
    names = list(FAMILIES)
    weights = [WEIGHTS.get(name, (1 - sum(WEIGHTS.values())) / (len(names) - len(WEIGHTS))) for name in names]
    for _ in range(n):
        family = rng.choices(names, weights)[0]
        text = FAMILIES[family](rng)
        if family not in ("megabyte strings", "tags inside tags", "code injection") and rng.random() < 0.7:
            text = _wrap(text, rng)
        yield family, text


@contextlib.contextmanager
def nothing_may_run():
    """Trap eval/exec/compile while our own verifiers run (they must never need them)."""
    originals = builtins.eval, builtins.exec, builtins.compile
    attempts = []

    def trap(*args, **kwargs):
        attempts.append(str(args)[:200])
        raise RuntimeError("a verifier tried to run code")

    builtins.eval = builtins.exec = builtins.compile = trap
    try:
        yield attempts
    finally:
        builtins.eval, builtins.exec, builtins.compile = originals


def could_name_code(text: str) -> bool:
    """Could ``text``, handed to sympy's parse_expr (which evals it), name or call anything? Digits (any
    script), spaces and operators cannot: a Python name needs a letter or underscore, and attribute,
    subscript or call tricks need quotes, brackets or the like."""
    return any(ch.isidentifier() or ch in "'\"`[]{},:;=@\\" for ch in text)


def code_calls_in_verifiers() -> int:
    """Calls of eval/exec/compile/__import__ in zerorl/rewards (the AST, so comments don't count)."""
    count = 0
    for path in (REPO / "zerorl" / "rewards").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                    node.func.id in ("eval", "exec", "compile", "__import__"):
                count += 1
    return count


def fuzz_benchmark(n: int, seed: int) -> list[dict]:
    import math_verify.parser

    from zerorl.rewards import countdown_accuracy, format_reward, integer_accuracy, math_accuracy

    rng = random.Random(seed + 1)
    references = ["42", "\\frac{1}{2}", "x^2+1", "\\sqrt{2}", "-3", "0", "1000000"]
    verifiers = {
        "format_reward": lambda text: format_reward(["p"], [text]),
        "integer_accuracy": lambda text: integer_accuracy(["p"], [text], answer=[str(rng.randint(-10**6, 10**6))]),
        "math_accuracy": lambda text: math_accuracy(["p"], [text], answer=[rng.choice(references)]),
        "countdown_accuracy": lambda text: countdown_accuracy(
            ["p"], [text], numbers=[[rng.randint(1, 100) for _ in range(rng.randint(1, 6))]],
            target=[rng.randint(-1000, 1000)], require_all=rng.random() < 0.5),
    }
    results = []
    for index, (name, verify) in enumerate(verifiers.items()):
        CANARY.unlink(missing_ok=True)
        crashes, bad_scores, slow, worst, worst_family, reached_sympy = 0, 0, 0, 0.0, "", []
        by_family: dict[str, int] = {}
        original_parse_expr = math_verify.parser.parse_expr

        def watched_parse_expr(text, *args, seen=reached_sympy, parse=original_parse_expr, **kwargs):
            seen.append(text)
            return parse(text, *args, **kwargs)

        math_verify.parser.parse_expr = watched_parse_expr
        start_all = time.perf_counter()
        # math-verify itself compiles sympy expressions (after our arithmetic-only check); trap only ours.
        trap = contextlib.nullcontext([]) if name == "math_accuracy" else nothing_may_run()
        try:
            with trap as attempts:
                for family, text in adversarial_inputs(n, seed * 100 + index):
                    by_family[family] = by_family.get(family, 0) + 1
                    start = time.perf_counter()
                    try:
                        scores = verify(text)
                    except Exception:  # noqa: BLE001 - a crash is what we count
                        crashes += 1
                        scores = [0.0]
                    elapsed = time.perf_counter() - start
                    if elapsed > worst:
                        worst, worst_family = elapsed, family
                    slow += elapsed > 1.0
                    bad_scores += not (len(scores) == 1 and scores[0] in (0.0, 1.0))
        finally:
            math_verify.parser.parse_expr = original_parse_expr
        executed = len(attempts) + CANARY.exists() + sum(map(could_name_code, reached_sympy))
        results.append({"verifier": name, "inputs": n, "crashes": crashes, "bad_scores": bad_scores,
                        "over_1s": slow, "max_ms": 1000 * worst, "worst_family": worst_family,
                        "executed": executed, "seconds": time.perf_counter() - start_all, "families": by_family})
        print(f"{name}: {n} inputs, crashes {crashes}, over 1 s {slow}, max {1000 * worst:.1f} ms "
              f"({worst_family}), executed {executed}", flush=True)
    return results


# ================================================================================================

def render(kills: dict, fuzz: list[dict], eval_calls: int, total_seconds: float, args) -> str:
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch threads 1, Python {platform.python_version()}"
    lines = [
        f"## Reliability (benchmarks/reliability.py) — {date.today().isoformat()}, {machine}",
        "",
        f"`OMP_NUM_THREADS=1 python benchmarks/reliability.py --kills {args.kills} --fuzz {args.fuzz} "
        f"--seed {args.seed}`; {total_seconds / 60:.1f} min in all. Run: tiny random Qwen2, GRPO {MAX_STEPS} steps, "
        "μ=2 × 2 minibatches, β=0.04, cosine LR, eval before/after, save_steps=3, save_total_limit=2, a user "
        "reward function in a worker process (reward_timeout_s=30).",
        "",
        "| kill / resume | value |",
        "|---|---|",
        f"| kill points survived / tried (SIGKILL, then `--resume`; final weights bitwise equal) | "
        f"**{kills['survived']} / {kills['tried']}** |",
        "| kill points by kind: random delay over the whole process / mid-step k / mid-checkpoint-write | "
        f"{kills['by_mode'].get('delay', 0)} / {kills['by_mode'].get('step', 0)} / "
        f"{kills['by_mode'].get('checkpoint', 0)} |",
        f"| of which killed before config.yaml existed (started again, nothing to lose) | {kills['restarted']} |",
        f"| checkpoint directories scanned after kills and after resumes / found corrupt | "
        f"{kills['scanned']} / **{kills['corrupt']}** |",
        f"| uninterrupted reference run (wall time, includes ~5 s interpreter start-up) | "
        f"{kills['reference_seconds']:.1f} s |",
        "",
        "| verifier | adversarial inputs | crashes | scores ∉ {0,1} | calls > 1 s | max ms per call "
        "(family) | code executed |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in fuzz:
        lines.append(f"| {row['verifier']} | {row['inputs']} | {row['crashes']} | {row['bad_scores']} | "
                     f"{row['over_1s']} | {row['max_ms']:.1f} ({row['worst_family']}) | {row['executed']} |")
    families = fuzz[0]["families"]
    lines += [
        "",
        "Families per verifier (same seeded mix): " + ", ".join(f"{k} {v}" for k, v in families.items()) + ".",
        f"`eval`/`exec`/`compile`/`__import__` calls in zerorl/rewards/*.py (AST): {eval_calls}.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=30, help="trials (each kills once, some twice)")
    parser.add_argument("--fuzz", type=int, default=10_000, help="adversarial inputs per verifier")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-append", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="zerorl-reliability-"))
    try:
        kills = kill_benchmark(args.kills, args.seed, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    fuzz = fuzz_benchmark(args.fuzz, args.seed)
    table = render(kills, fuzz, code_calls_in_verifiers(), time.monotonic() - start, args)
    print()
    print(table)
    for problem in kills["problems"]:
        print("problem:", problem)
    if not args.no_append:
        with open(REPO / "benchmarks" / "RESULTS.md", "a") as handle:
            handle.write("\n" + table)
        print("appended to benchmarks/RESULTS.md")
    ok = kills["survived"] == kills["tried"] and kills["corrupt"] == 0 and all(
        r["crashes"] == r["over_1s"] == r["executed"] == r["bad_scores"] == 0 for r in fuzz)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
