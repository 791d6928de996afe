"""Metrics, progress and plots: JSONL metrics, a console progress bar, PNG learning curves."""

from zerorl.tracking.metrics import MetricsLogger, read_metrics
from zerorl.tracking.plots import plot_lm_run

__all__ = ["MetricsLogger", "read_metrics", "plot_lm_run"]
