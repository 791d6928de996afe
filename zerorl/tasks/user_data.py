"""Tasks from user data: JSON Lines files and local Hugging Face datasets.

Every row is checked when the task is built, so a bad line fails at start-up with its file, line
number, column and the fix, not as a KeyError in the middle of a run. Rows are renamed to the
standard ``prompt`` / ``answer`` columns; all other fields stay as extra columns for reward functions.

Split: with ``eval_path`` the eval rows come from that file and training rows whose prompt also
appears there are dropped; otherwise a seeded ``eval_fraction`` of the *distinct prompts* is held
out (duplicates of a prompt always land on the same side). Training order is a fresh seeded
permutation each epoch, so ``train_row(index)`` stays a pure function of the index.
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from zerorl.rewards.accuracy import math_accuracy
from zerorl.rewards.format import format_reward
from zerorl.rewards.isolation import ProcessRewardFunction
from zerorl.rewards.loading import resolve_reward
from zerorl.rewards.reward_set import RewardFn
from zerorl.tasks.base import Row, Task, check_index, row_rng

_RESERVED = ("prompts", "completions")  # the reward functions' own argument names


class DataFormatError(ValueError):
    """A row of user data is malformed (the message names the file, line, column and fix)."""


def read_jsonl(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """``(location, object)`` for each non-blank line of a JSON Lines file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {str(path)!r} does not exist (resolved to {path.resolve()})")
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            location = f"{path}, line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFormatError(
                    f"{location}: not valid JSON ({error.msg} at column {error.colno}). Each line must be one JSON "
                    'object, e.g. {"prompt": "What is 2+3?", "answer": "5"}'
                ) from None
            if not isinstance(record, dict):
                raise DataFormatError(
                    f"{location}: expected a JSON object, got {type(record).__name__}. Each line must look like "
                    '{"prompt": "...", "answer": "..."}'
                )
            records.append((location, record))
    if not records:
        raise DataFormatError(f"{path}: no rows (the file is empty); add one JSON object per line")
    return records


def _check_prompt(prompt: Any, location: str, column: str) -> None:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataFormatError(
                f"{location}: column {column!r} is empty; every row needs a non-empty prompt"
            )
        return
    if isinstance(prompt, list) and prompt:
        for i, message in enumerate(prompt):
            if not (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                raise DataFormatError(
                    f"{location}: column {column!r} message {i} is {message!r}; chat prompts must be lists of "
                    '{"role": "...", "content": "..."} objects'
                )
        return
    raise DataFormatError(
        f"{location}: column {column!r} holds {type(prompt).__name__} {str(prompt)[:60]!r}; a prompt must be a "
        "non-empty string or a non-empty list of chat messages"
    )


def standardize_rows(
    records: Iterable[tuple[str, dict[str, Any]]], prompt_column: str, answer_column: str | None
) -> list[Row]:
    """Check every record and rename its columns to ``prompt`` / ``answer`` (answers become strings)."""
    rows = []
    for location, record in records:
        for column in (prompt_column, answer_column):
            if column is not None and column not in record:
                present = ", ".join(sorted(record)) or "none"
                raise DataFormatError(
                    f"{location}: missing column {column!r} (columns present: {present}). Add it to every row or "
                    f"point the task at another column, e.g. {'prompt' if column == prompt_column else 'answer'}"
                    f"_column='<name>'"
                )
        for column in _RESERVED:
            if column in record:
                raise DataFormatError(
                    f"{location}: column {column!r} would clash with the reward functions' {column!r} argument; rename it"
                )
        _check_prompt(record[prompt_column], location, prompt_column)
        row = {k: v for k, v in record.items() if k not in (prompt_column, answer_column)}
        row["prompt"] = record[prompt_column]
        if answer_column is not None:
            answer = record[answer_column]
            if answer is None or isinstance(answer, (dict, list)):
                raise DataFormatError(
                    f"{location}: column {answer_column!r} is {answer!r}; an answer must be a string or a number"
                )
            row["answer"] = answer if isinstance(answer, str) else json.dumps(answer)
        rows.append(row)
    return rows


def _prompt_key(row: Row) -> str:
    return json.dumps(row["prompt"], sort_keys=True, ensure_ascii=False)


class RowsTask(Task):
    """A finite list of rows with a held-out split, reward specs and per-epoch shuffling."""

    name = "rows"

    def __init__(
        self,
        rows: list[Row],
        eval_rows: list[Row] | None = None,
        eval_fraction: float = 0.05,
        seed: int = 0,
        rewards: list[str] | str | None = None,
        reward_timeout_s: float | None = None,
        format_weight: float = 1.0,
        completion_column: str | None = None,
        source: str = "dataset",
    ):
        if not 0.0 <= eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}")
        self.seed = seed
        self.rewards = [rewards] if isinstance(rewards, str) else list(rewards or [])
        self.reward_timeout_s = reward_timeout_s
        self.format_weight = format_weight
        self.completion_column = completion_column
        self.dropped_overlap = 0
        if eval_rows is not None:
            eval_keys = {_prompt_key(row) for row in eval_rows}
            train_rows = [row for row in rows if _prompt_key(row) not in eval_keys]
            self.dropped_overlap = len(rows) - len(train_rows)
            if self.dropped_overlap:
                warnings.warn(
                    f"{source}: dropped {self.dropped_overlap} training rows whose prompt is also in the eval set",
                    stacklevel=3,
                )
        else:
            keys = list(dict.fromkeys(_prompt_key(row) for row in rows))
            row_rng(seed, "split", 0).shuffle(keys)
            num_eval = round(eval_fraction * len(keys))
            if eval_fraction > 0 and len(keys) >= 2:
                num_eval = min(max(num_eval, 1), len(keys) - 1)
            eval_keys = set(keys[:num_eval])
            train_rows = [row for row in rows if _prompt_key(row) not in eval_keys]
            eval_rows = [row for row in rows if _prompt_key(row) in eval_keys]
        if not train_rows:
            raise DataFormatError(f"{source}: no training rows are left after holding out the eval set")
        self._train_rows, self._eval_rows = train_rows, eval_rows
        self._permutation: tuple[int, list[int]] | None = None
        self._reward_funcs: list[tuple[str, RewardFn, float]] | None = None

    @property
    def num_train_rows(self) -> int:
        return len(self._train_rows)

    def train_row(self, index: int) -> Row:
        check_index(index)
        epoch, position = divmod(index, len(self._train_rows))
        if self._permutation is None or self._permutation[0] != epoch:
            order = list(range(len(self._train_rows)))
            row_rng(self.seed, "epoch", epoch).shuffle(order)
            self._permutation = (epoch, order)
        return dict(self._train_rows[self._permutation[1][position]])

    def eval_rows(self, n: int | None = None) -> list[Row]:
        if n is None:
            n = len(self._eval_rows)
        if not 0 <= n <= len(self._eval_rows):
            raise ValueError(
                f"asked for {n} eval rows but only {len(self._eval_rows)} are held out; lower the eval count or "
                "raise eval_fraction (or pass a larger eval_path)"
            )
        return [dict(row) for row in self._eval_rows[:n]]

    def reward_funcs(self) -> list[tuple[str, RewardFn, float]]:
        """``format`` plus ``math_accuracy`` (math-verify against the answer column), or plus the user's
        ``rewards`` specs ("module:fn", "file.py:fn" or a built-in name) instead of math_accuracy; with
        ``reward_timeout_s`` each user function runs in its own ``ProcessRewardFunction``."""
        if self._reward_funcs is None:
            funcs: list[tuple[str, RewardFn, float]] = [("format", format_reward, self.format_weight)]
            if not self.rewards:
                funcs.insert(0, ("accuracy", math_accuracy, 1.0))
            for spec in self.rewards:
                name = spec.rpartition(":")[2]
                if self.reward_timeout_s is not None:
                    funcs.append((name, ProcessRewardFunction(spec, self.reward_timeout_s, name=name), 1.0))
                else:
                    funcs.append((name, resolve_reward(spec), 1.0))
            self._reward_funcs = funcs
        return list(self._reward_funcs)

    def cold_start_completion(self, row: Row, rng: random.Random, error_rate: float = 0.0) -> str:
        if self.completion_column is None or self.completion_column not in row:
            raise NotImplementedError(
                f"task {self.name!r} cannot invent reasoning traces for user data; give the rows a column with "
                "full '<think>…</think><answer>…</answer>' completions and pass completion_column='<name>'"
            )
        if error_rate:
            raise ValueError("error_rate is not supported for user data (its completions are used as given)")
        return str(row[self.completion_column])


class JsonlTask(RowsTask):
    """Rows from a JSON Lines file: one ``{"prompt": ..., "answer": ..., ...}`` object per line."""

    name = "jsonl"

    def __init__(
        self,
        path: str | Path,
        prompt_column: str = "prompt",
        answer_column: str | None = "answer",
        eval_fraction: float = 0.05,
        eval_path: str | Path | None = None,
        seed: int = 0,
        rewards: list[str] | str | None = None,
        reward_timeout_s: float | None = None,
        format_weight: float = 1.0,
        completion_column: str | None = None,
    ):
        self.path = Path(path)
        rows = standardize_rows(read_jsonl(self.path), prompt_column, answer_column)
        eval_rows = None
        if eval_path is not None:
            eval_rows = standardize_rows(read_jsonl(eval_path), prompt_column, answer_column)
        super().__init__(
            rows,
            eval_rows,
            eval_fraction,
            seed,
            rewards,
            reward_timeout_s,
            format_weight,
            completion_column,
            source=str(self.path),
        )


class HFDatasetTask(RowsTask):
    """Rows from a Hugging Face dataset saved with ``save_to_disk`` (loaded with ``load_from_disk``; no
    hub access). For a ``DatasetDict`` pick ``split`` (and optionally ``eval_split`` instead of
    ``eval_fraction``)."""

    name = "hf_dataset"

    def __init__(
        self,
        path: str | Path,
        split: str | None = "train",
        eval_split: str | None = None,
        prompt_column: str = "prompt",
        answer_column: str | None = "answer",
        eval_fraction: float = 0.05,
        seed: int = 0,
        rewards: list[str] | str | None = None,
        reward_timeout_s: float | None = None,
        format_weight: float = 1.0,
        completion_column: str | None = None,
    ):
        try:
            import datasets
        except ImportError as error:
            raise ImportError(
                "HFDatasetTask needs the 'datasets' package: pip install datasets (or convert the data to JSON "
                "Lines and use JsonlTask)"
            ) from error
        if not Path(path).exists():
            raise FileNotFoundError(
                f"dataset folder {str(path)!r} does not exist (expected a save_to_disk folder)"
            )
        loaded = datasets.load_from_disk(str(path))

        def records(split_name: str | None) -> list[tuple[str, dict[str, Any]]]:
            dataset = loaded
            if isinstance(loaded, datasets.DatasetDict):
                if split_name not in loaded:
                    raise DataFormatError(
                        f"{path}: no split {split_name!r}; available splits: {sorted(loaded)}"
                    )
                dataset = loaded[split_name]
            return [(f"{path} [{split_name}], row {i}", dict(item)) for i, item in enumerate(dataset)]

        rows = standardize_rows(records(split), prompt_column, answer_column)
        eval_rows = (
            standardize_rows(records(eval_split), prompt_column, answer_column) if eval_split else None
        )
        super().__init__(
            rows,
            eval_rows,
            eval_fraction,
            seed,
            rewards,
            reward_timeout_s,
            format_weight,
            completion_column,
            source=str(path),
        )
