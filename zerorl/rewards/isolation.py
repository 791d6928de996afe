"""Run a user reward function in its own process, with a per-call timeout.

A user's verifier may hang (an infinite loop, a sympy blow-up, a network call), crash the interpreter,
or leak memory; none of that should take the trainer down. ``ProcessRewardFunction`` keeps one
persistent worker, a fresh interpreter (spawned, never forked: no copied CUDA or thread state) that
imports the function once and then answers calls over a private pair of pipes. A call that does not answer within ``timeout_s`` gets the worker
killed (SIGKILL, which also stops code stuck inside C) and a ``RewardTimeoutError``; the next call
starts a fresh worker. Running in the worker's main thread also makes math-verify's signals work.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from zerorl.rewards.loading import RewardLoadError, resolve_reward


class RewardTimeoutError(TimeoutError):
    """A reward function did not return within its timeout; its worker was killed."""


class RewardWorkerError(RuntimeError):
    """A reward function raised inside its worker process, or the worker died."""


# Why not multiprocessing's spawn context: it re-runs the parent's __main__ script in the child, so a
# training script without an `if __name__ == "__main__":` guard would start training again inside every
# reward worker. A plain subprocess running only this module cannot do that. The worker talks over its
# own two pipes (multiprocessing's framed pickle Connection), so the user's prints to stdout are harmless.
_WORKER_COMMAND = "import sys; from zerorl.rewards.isolation import _worker_main; _worker_main(*sys.argv[1:])"


def _worker_main(spec: str, read_fd: str, write_fd: str) -> None:
    """Loop of the worker process: load the function, then answer (prompts, completions, columns)."""
    # Ctrl-C reaches the whole process group; the trainer handles it and closes us, so don't die noisily.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inbox, connection = Connection(int(read_fd), writable=False), Connection(int(write_fd), readable=False)
    try:
        fn = resolve_reward(spec)
    except BaseException as error:  # report any load failure to the parent instead of dying silently
        connection.send(("load_error", f"{type(error).__name__}: {error}"))
        return
    connection.send(("ready", None))
    while True:
        try:
            message = inbox.recv()
        except (EOFError, OSError):
            return  # the parent went away
        if message is None:
            return
        prompts, completions, columns = message
        try:
            result = fn(prompts=prompts, completions=completions, **columns)
            # RewardSet checks the values; here we only make sure the result can cross the pipe.
            if hasattr(result, "tolist"):  # numpy arrays and tensors
                result = result.tolist()
            connection.send(("ok", result))
        except BaseException:
            connection.send(("error", traceback.format_exc(limit=8)))


class ProcessRewardFunction:
    """A reward function (``spec`` as for ``load_reward_function``, or a built-in name) called in a
    persistent worker process with a per-call timeout. Use it like the function itself::

        reward = ProcessRewardFunction("my_rewards.py:score", timeout_s=10)
        reward(prompts=prompts, completions=completions, answer=answers)   # -> list[float]

    The worker starts in the constructor so that import errors surface at start-up, not at step 1
    (``start_timeout_s`` bounds that import). Call ``close()`` when done (also done on garbage
    collection); if the trainer dies instead, the worker sees its pipe close and exits.
    """

    def __init__(
        self, spec: str, timeout_s: float = 30.0, name: str | None = None, start_timeout_s: float = 120.0
    ):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
        self.spec = spec
        self.name = name or spec
        self.timeout_s = float(timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        self.restarts = 0  # workers killed after a timeout or crash; worth logging
        self.__name__ = self.name  # so it reads like a function in logs and RewardSet names
        self._process: subprocess.Popen | None = None
        self._outbox: Connection | None = None
        self._connection: Connection | None = None
        self._start()

    def _start(self) -> None:
        to_worker_read, to_worker_write = os.pipe()
        from_worker_read, from_worker_write = os.pipe()
        # The worker must import zerorl and the user's modules exactly as this process does.
        environment = dict(os.environ, PYTHONPATH=os.pathsep.join(p or os.getcwd() for p in sys.path))
        try:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _WORKER_COMMAND,
                    self.spec,
                    str(to_worker_read),
                    str(from_worker_write),
                ],
                pass_fds=(to_worker_read, from_worker_write),
                env=environment,
                stdin=subprocess.DEVNULL,
            )
        finally:
            os.close(to_worker_read)
            os.close(from_worker_write)
        self._process = process
        self._outbox = Connection(to_worker_write, readable=False)
        self._connection = Connection(from_worker_read, writable=False)
        if not self._connection.poll(self.start_timeout_s):
            self._kill()
            raise RewardTimeoutError(
                f"reward function {self.name!r}: the worker did not finish importing it within "
                f"{self.start_timeout_s:g} s (raise start_timeout_s if the import is slow)"
            )
        try:
            status, detail = self._connection.recv()
        except EOFError:
            self._kill()
            raise RewardWorkerError(
                f"reward function {self.name!r}: the worker died while loading it"
            ) from None
        if status == "load_error":
            self._kill()
            raise RewardLoadError(
                f"reward function {self.name!r} could not be loaded in the worker: {detail}"
            )

    def _kill(self) -> None:
        if self._process is not None:
            self._process.kill()  # SIGKILL: also stops code stuck inside a C extension
            self._process.wait(timeout=5)
        for connection in (self._outbox, self._connection):
            if connection is not None:
                connection.close()
        self._process, self._outbox, self._connection = None, None, None

    def __call__(self, prompts: Sequence, completions: Sequence, **columns: Any) -> list:
        if self._process is None or self._process.poll() is not None:
            if self._process is not None:  # died since the last call (e.g. the OOM killer)
                self._kill()
                self.restarts += 1
            self._start()
        message = (list(prompts), list(completions), {key: list(values) for key, values in columns.items()})
        try:
            self._outbox.send(message)
            answered = self._connection.poll(self.timeout_s)
        except OSError:  # broken pipe: the worker is gone; recv() below reports it
            answered = True
        if not answered:
            self._kill()
            self.restarts += 1
            raise RewardTimeoutError(
                f"reward function {self.name!r} did not return within {self.timeout_s:g} s on a batch of "
                f"{len(completions)} completions; its worker was killed (a new one starts on the next call). "
                "Make the function faster or raise its timeout"
            )
        try:
            status, payload = self._connection.recv()
        except (EOFError, OSError):
            exit_code = None
            if self._process is not None:
                try:
                    exit_code = self._process.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    pass
            self._kill()
            self.restarts += 1
            raise RewardWorkerError(
                f"reward function {self.name!r}: its worker process died (exit code {exit_code}); "
                "a new one starts on the next call"
            ) from None
        if status == "error":
            raise RewardWorkerError(f"reward function {self.name!r} raised in its worker process:\n{payload}")
        return payload

    def close(self) -> None:
        """Stop the worker (politely, then by force)."""
        if self._process is None:
            return
        try:
            self._outbox.send(None)
            self._process.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self._kill()

    def __enter__(self) -> ProcessRewardFunction:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
