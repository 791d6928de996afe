"""Learning-curve PNGs for a run directory (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from zerorl.tracking.metrics import read_metrics

# (metric key in metrics.jsonl, panel title)
LM_PANELS = [
    ("reward", "mean reward"),
    ("rewards/accuracy/mean", "accuracy reward (train)"),
    ("completions/mean_length", "completion length (tokens)"),
    ("kl", "KL to reference"),
    ("clip_ratio", "clip ratio"),
    ("entropy", "entropy"),
]


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_lm_run(run_dir: str | Path, summary: dict | None = None) -> Path | None:
    """Draw the training curves (and held-out accuracy before/after) into run_dir/training.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        return None
    panels = [(key, title) for key, title in LM_PANELS if any(key in row for row in rows)]
    reward_keys = sorted({k for row in rows for k in row if k.startswith("rewards/") and k.endswith("/mean")})
    panels = [p for p in panels if not p[0].startswith("rewards/")]
    panels.insert(1, ("__rewards__", "rewards by function"))
    if summary and summary.get("eval_before") and summary.get("eval_after"):
        panels.append(("__eval__", "held-out accuracy"))
    ncols = 3
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    window = max(1, len(rows) // 20)
    for ax, (key, title) in zip(axes.flat, panels):
        if key == "__rewards__":
            for rkey in reward_keys:
                steps = [r["step"] for r in rows if rkey in r]
                ax.plot(steps, _smooth([r[rkey] for r in rows if rkey in r], window),
                        label=rkey.split("/")[1])
            ax.legend(fontsize=8)
        elif key == "__eval__":
            labels = ["greedy", "sampled"]
            before = [summary["eval_before"]["accuracy_greedy"], summary["eval_before"]["accuracy_sampled"]]
            after = [summary["eval_after"]["accuracy_greedy"], summary["eval_after"]["accuracy_sampled"]]
            xs = range(len(labels))
            ax.bar([x - 0.2 for x in xs], before, width=0.4, label="before RL")
            ax.bar([x + 0.2 for x in xs], after, width=0.4, label="after RL")
            ax.set_xticks(list(xs), labels)
            ax.set_ylim(0, 1.2)  # room above the bars for the legend
            ax.legend(fontsize=8, loc="upper center", ncol=2)
        else:
            steps = [r["step"] for r in rows if isinstance(r.get(key), (int, float))]
            values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
            ax.plot(steps, values, alpha=0.3, color="C0")
            ax.plot(steps, _smooth(values, window), color="C0")
        ax.set_title(title, fontsize=10)
        if key != "__eval__":
            ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    out = run_dir / "training.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
