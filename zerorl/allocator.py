"""Run the ``zerorl`` command under jemalloc or tcmalloc where the machine has one.

A training step allocates and frees the same large tensors over and over (activations, their gradients,
casts). glibc's malloc serves them from per-thread heaps that fragment and from fresh mmaps that page-fault
on every use; jemalloc and tcmalloc keep freed blocks by size and reuse them. Measured here (2 cores,
``zerorl train`` with benchmarks/vs_trl.py's settings, one run each, docs/performance.md):

    model, precision   glibc                 jemalloc               tcmalloc
    31.5M, fp32        2.34–2.44 s, 1,529–1,550 MB   2.25–2.28 s, 1,290–1,305 MB   2.13 s, 1,465–1,520 MB
    1.0M, fp32         0.203–0.207 s, 397–401 MB     0.188–0.191 s, 374 MB         0.179–0.188 s, 411 MB
    31.5M, bf16        1.51 s, 1,889 MB              1.08 s, 1,794 MB              0.98 s, 1,719 MB

The allocator has to be chosen before the process starts (``LD_PRELOAD``), so the command re-executes itself
once with the library preloaded — what PyTorch's own CPU launcher (``torch.backends.xeon.run_cpu``) does.
``ZERORL_ALLOCATOR`` picks: ``auto`` (default: jemalloc, else tcmalloc, else glibc's malloc), ``jemalloc``,
``tcmalloc`` or ``system``. Neither library comes from PyPI: ``apt-get install libjemalloc2`` (Debian,
Ubuntu), ``conda install jemalloc``, or ``libtcmalloc-minimal4`` / ``gperftools``. Only the command line
re-executes; ``import zerorl`` in a program of your own leaves its allocator alone.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

CHOICES = ("auto", "jemalloc", "tcmalloc", "system")
ENV_CHOICE = "ZERORL_ALLOCATOR"
# Set in the re-executed process: it never re-executes again, whatever it finds.
ENV_APPLIED = "ZERORL_ALLOCATOR_APPLIED"
LIBRARIES = {
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so"),
}
INSTALL_HINT = {
    "jemalloc": "apt-get install libjemalloc2 (Debian/Ubuntu) or conda install jemalloc",
    "tcmalloc": "apt-get install libtcmalloc-minimal4 (Debian/Ubuntu) or conda install gperftools",
}


class AllocatorError(ValueError):
    """A requested allocator that cannot be used here."""


def search_dirs() -> list[Path]:
    """Where shared libraries of this environment and of the system live, most specific first."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    candidates = [os.environ.get("CONDA_PREFIX", ""), sys.prefix]
    dirs = [Path(prefix) / "lib" for prefix in candidates if prefix]
    for root in ("/usr/lib", "/lib", "/usr/local/lib"):
        if multiarch:
            dirs.append(Path(root) / multiarch)
        dirs.append(Path(root))
    dirs.append(Path("/usr/lib64"))
    return dirs


def find(kind: str, dirs: list[Path] | None = None) -> str | None:
    """The path of allocator ``kind``'s shared library, or None."""
    for directory in search_dirs() if dirs is None else dirs:
        for name in LIBRARIES[kind]:
            path = directory / name
            if path.is_file():
                return str(path)
    return None


def loaded(maps: str | None = None) -> str | None:
    """Which of the allocators this process runs on (from /proc/self/maps), or None for the system's."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return None
    for kind in LIBRARIES:
        if f"lib{kind}" in maps:
            return kind
    return None


def resolve(choice: str, dirs: list[Path] | None = None) -> tuple[str, str | None]:
    """(allocator, library path) for a ``ZERORL_ALLOCATOR`` value; ("system", None) for glibc's malloc."""
    if choice not in CHOICES:
        raise AllocatorError(f"{ENV_CHOICE}={choice!r} is not an allocator zerorl knows. "
                             f"Fix: one of {', '.join(CHOICES)}.")
    if choice == "system":
        return "system", None
    dirs = search_dirs() if dirs is None else dirs
    kinds = list(LIBRARIES) if choice == "auto" else [choice]
    for kind in kinds:
        path = find(kind, dirs)
        if path is not None:
            return kind, path
    if choice == "auto":
        return "system", None
    raise AllocatorError(f"{ENV_CHOICE}={choice}: no {' or '.join(LIBRARIES[choice])} on this machine "
                         f"(looked in {', '.join(str(d) for d in dirs)}). "
                         f"Fix: {INSTALL_HINT[choice]}, or {ENV_CHOICE}=auto to run on what there is.")


def relaunch_plan(environ: dict[str, str], dirs: list[Path] | None = None, platform: str = sys.platform,
                  running_on: str | None = None) -> tuple[str, dict[str, str]] | None:
    """What to re-execute the command with (the allocator, the new environment), or None to run as is: not on
    Linux, already re-executed once, the system allocator asked for or nothing better found, or an allocator
    already preloaded (the user's ``LD_PRELOAD`` wins)."""
    choice = environ.get(ENV_CHOICE, "auto").strip().lower() or "auto"
    kind, path = resolve(choice, dirs)  # a bad or missing choice is an error on every platform
    if platform != "linux" or environ.get(ENV_APPLIED) or kind == "system" or running_on is not None:
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = f"{path}:{environ['LD_PRELOAD']}" if environ.get("LD_PRELOAD") else path
    env[ENV_APPLIED] = kind
    return kind, env


def relaunch(command: list[str]) -> None:
    """Re-execute ``command`` (argv, program first) under the allocator ``ZERORL_ALLOCATOR`` picks, or return
    to run in this process as it is. Does not return when it re-executes."""
    plan = relaunch_plan(dict(os.environ), running_on=loaded())
    if plan is None:
        return
    _, env = plan
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, env)


__all__ = ["CHOICES", "ENV_APPLIED", "ENV_CHOICE", "AllocatorError", "find", "loaded", "relaunch", "relaunch_plan",
           "resolve"]
