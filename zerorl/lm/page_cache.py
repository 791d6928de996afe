"""Frozen weights that live in the operating system's page cache and are mapped in only while they are read.

The reference model π_ref of the KL penalty is a full copy of the policy's weights (126 MB for the 31.5M
benchmark model, 2 GB for a 0.5B model in float32) that a step reads once, in the reference pass, and never
writes. Kept in ordinary memory, it sits in the process's resident set through the rollout and the training
pass, where the memory peaks are. ``PageCacheWeights`` moves such a module's parameters into a shared mapping of
a file and, after each use, tells the kernel to drop the mapping's pages from the process (``MADV_DONTNEED``).
The bytes stay in the page cache: reading them again maps them back with a few thousand minor faults (the kernel
maps 16 pages a fault), no copy and no disk read while memory is plentiful; under memory pressure the kernel may
write them to the file and reclaim them, which ordinary memory cannot do without swap. This is the page-cache
form of what verl calls parameter offload (``ref.param_offload``), and how llama.cpp holds its weights.

Measured (benchmarks/step_ab.py, paged against ``ref_offload=false``, 2 CPU threads): the 31.5M benchmark model's
peak RSS 1,307 → 1,205 MB, a 0.5B-class Qwen2's 11,162 → 9,262 MB, step times within noise (docs/performance.md).

The mapping is read-write and shared, so everything a module does still works: ``load_state_dict`` (a resumed
checkpoint, ``ref_model_sync_steps``) writes through to the file, and ``state_dict`` reads it. Dropping the pages
loses nothing — for a shared mapping the file is the truth. The file is created unlinked (``TemporaryFile``) in
the run's output directory: it takes the weights' size on that disk, reserved up front (``posix_fallocate``, so
a full disk fails here with a clear error rather than as a SIGBUS mid-run), and disappears with the process, even
after a crash.
"""

from __future__ import annotations

import errno
import mmap
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from zerorl.config import ConfigError

_ALIGN = 64  # bytes; every tensor starts on a cache line (and on any element size's boundary)


def page_cache_supported() -> bool:
    """Linux: shared file mappings whose pages ``MADV_DONTNEED`` drops from the process and the file keeps.
    (macOS treats the advice as a hint that may do nothing; Windows has no madvise.)"""
    return sys.platform.startswith("linux") and hasattr(mmap, "MADV_DONTNEED") and hasattr(os, "posix_fallocate")


class PageCacheWeights:
    """A module's parameters moved into one shared file mapping; ``release()`` drops their pages from the process.

    Call ``release()`` after the passes that read the weights. Parameters keep their objects, shapes, dtypes and values (tied weights stay tied); only their
    storage moves. CPU parameters only."""

    def __init__(self, module: nn.Module, directory: str | os.PathLike):
        params = [p for p in module.parameters() if p.numel() > 0]  # unique objects: a tied weight once
        if any(p.device.type != "cpu" for p in params):
            raise ValueError("PageCacheWeights maps CPU parameters only; this module has parameters on "
                             f"{sorted({p.device.type for p in params} - {'cpu'})}.")
        offsets, size = [], 0
        for p in params:
            size = -(-size // _ALIGN) * _ALIGN
            offsets.append(size)
            size += p.numel() * p.element_size()
        self.nbytes = size
        Path(directory).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory, prefix="zerorl-pages-") as file:  # unlinked from the start
            try:
                os.posix_fallocate(file.fileno(), 0, max(size, 1))
            except OSError as err:
                fix = "free disk space there" if err.errno in (errno.ENOSPC, errno.EDQUOT) else \
                    "use an output_dir on a local disk"
                raise OSError(err.errno, f"cannot reserve {size / 2**20:.0f} MB for the reference model's weights "
                                         f"in {str(directory)!r} ({err.strerror}). Fix: {fix}, or set "
                                         "ref_offload=false to keep them in memory.") from err
            self._map = mmap.mmap(file.fileno(), max(size, 1), flags=mmap.MAP_SHARED,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE)  # holds its own descriptor
        for p, offset in zip(params, offsets):
            mapped = torch.frombuffer(self._map, dtype=p.dtype, count=p.numel(), offset=offset).view(p.shape)
            mapped.copy_(p.detach())
            p.data = mapped
        self.release()

    def release(self) -> None:
        """Drop the weights' pages from this process's resident set; the next read maps them back."""
        self._map.madvise(mmap.MADV_DONTNEED)

    def resident_bytes(self) -> int:
        """Bytes of the mapping now in this process's resident set (from /proc/self/smaps; -1 if unreadable)."""
        start = _address(self._map)
        try:
            with open("/proc/self/smaps") as smaps:
                inside = False
                for line in smaps:
                    head = line.split(maxsplit=1)[0]
                    if "-" in head and not head.endswith(":"):
                        low = int(head.split("-")[0], 16)
                        inside = low == start
                    elif inside and head == "Rss:":
                        return int(line.split()[1]) * 1024
        except OSError:
            return -1
        return 0


def _address(mapping: mmap.mmap) -> int:
    """The mapping's start address (a zero-copy view's data pointer)."""
    return torch.frombuffer(mapping, dtype=torch.uint8, count=1).data_ptr()


def offload_reference(ref_model: nn.Module | None, config, directory: str | os.PathLike,
                      device: torch.device) -> PageCacheWeights | None:
    """π_ref's weights into the page cache where ``config.ref_offload`` asks for it (None = wherever it works: a
    CPU run on Linux, with room for the file); None when they stay in memory."""
    wanted = config.ref_offload
    if ref_model is None or wanted is False:
        return None
    if device.type != "cpu":
        if wanted:
            raise ConfigError(f"ref_offload=true keeps the reference model's weights in the page cache, where a CPU "
                             f"run reads them; this run's device is {device}, where they stay in device memory. "
                             "Fix: drop ref_offload (or set it to false).")
        return None
    if not page_cache_supported():
        if wanted:
            raise ConfigError(f"ref_offload=true needs Linux's madvise(MADV_DONTNEED) on file mappings; this is "
                             f"{sys.platform}. Fix: drop ref_offload (or set it to false).")
        return None
    try:
        return PageCacheWeights(ref_model, directory)
    except OSError as err:  # a full disk, a file system without shared mappings: the module is untouched
        if wanted:
            raise
        print(f"note: the reference model's weights stay in memory ({err})", file=sys.stderr, flush=True)
        return None


def release(pages: PageCacheWeights | None) -> None:
    """``pages.release()``; nothing for None (weights in ordinary memory)."""
    if pages is not None:
        pages.release()


__all__ = ["PageCacheWeights", "offload_reference", "page_cache_supported", "release"]
