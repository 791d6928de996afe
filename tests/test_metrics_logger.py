"""metrics.jsonl: one row per step, cut back on resume; a console line every logging_steps steps."""

from __future__ import annotations

from zerorl.tracking.metrics import MetricsLogger, format_row, read_metrics


def _row(step: int) -> dict:
    return {"step": step, "reward": 1.25, "reward_std": 0.5, "rewards/accuracy/mean": 0.75,
            "rewards/format/mean": 0.5, "rewards/format/errors": 0, "kl": 0.0012345, "step_time": 0.456,
            "time/generate": 0.2}


def test_every_step_is_written_and_every_nth_is_echoed(tmp_path):
    lines = []
    logger = MetricsLogger(tmp_path / "metrics.jsonl", echo_every=3, total_steps=7, echo=lines.append)
    for step in range(1, 8):
        logger.log(_row(step))
    assert [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 8))
    assert lines == [format_row(_row(3), 7), format_row(_row(6), 7)]
    assert lines[0] == ("step 3/7 | reward 1.25 | reward_std 0.5 | rewards/accuracy/mean 0.75 | "
                        "rewards/format/mean 0.5 | kl 0.00123 | step_time 0.46s")


def test_no_echo_at_zero_and_resume_cuts_the_file_back(tmp_path):
    lines = []
    logger = MetricsLogger(tmp_path / "metrics.jsonl", echo_every=0, echo=lines.append)
    for step in range(1, 6):
        logger.log(_row(step))
    assert lines == []
    MetricsLogger(tmp_path / "metrics.jsonl", resume_step=3)  # the checkpoint holds steps 1-3
    assert [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
