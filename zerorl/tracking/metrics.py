"""Per-step metrics as JSON lines, named the way TRL and verl users know them."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _to_python(value: Any) -> Any:
    if hasattr(value, "item"):  # 0-dim tensors and numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them visible instead of crashing
    return value


class MetricsLogger:
    """Appends one JSON object per step to ``metrics.jsonl``.

    On resume the file is truncated to the steps that the checkpoint already holds, so a killed
    run never leaves duplicated or orphaned lines behind.
    """

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [row for row in read_metrics(self.path) if row.get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
            os.replace(tmp, self.path)

    def log(self, row: dict[str, Any]) -> None:
        clean = {key: _to_python(value) for key, value in row.items()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(clean) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything after it is suspect
    return rows
