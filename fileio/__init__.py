"""Atomic file writes, the one way every layer writes a file: a temp file in the same folder, then a rename; and the
content hash (`file_sha256`) that keys caches and records which checkpoint a file was made from.

A reader (another process, a resumed run, a stage that consumes the file) sees either the old file or
the whole new one, never half of one: `os.replace` within one folder is atomic on POSIX and Windows.
A write that fails or is interrupted removes its temp file; only a kill (SIGKILL, power loss) can leave
one behind, named `.<name>.<random>.tmp` so that no reader ever takes it for the file.

Pure Python + torch/numpy/json conveniences; it imports nothing of this project, so `models/`,
`datamodules/`, `callbacks/`, `evaluation/` and `benchmarks/` may all use it.
"""

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: the mode an ordinary `open(path, "w")` would have given the file


def atomic_write(path: str | Path, write_fn: Callable[[Path], None], temp: str | Path | None = None) -> Path:
    """Write `path` through `write_fn(temp_path)`, then rename the temp file onto `path`; returns `path`.

    Args:
        path: the file to write (its folder is created).
        write_fn: writes the whole content to the path it is given.
        temp: a fixed temp path in the same folder, for a file only one process writes at a time: the
            next write then replaces what a killed one left. Default: a fresh unique name, safe when
            several processes write the same file at once (the last rename wins, whole).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if temp is None:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        os.chmod(name, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; the result reads like any other file
        temp = name
    temp = Path(temp)
    try:
        write_fn(temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


def save_torch(obj, path: str | Path) -> Path:
    """`torch.save(obj)` atomically."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_json(obj, path: str | Path, **dump_kwargs) -> Path:
    """`json.dump(obj, **dump_kwargs)` atomically (e.g. indent=1, sort_keys=True, default=str)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, **dump_kwargs)

    return atomic_write(path, write)


def save_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """`np.savez(**arrays)` atomically (through a file object, so numpy adds no second ".npz")."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return atomic_write(path, write)


def save_text(text: str, path: str | Path) -> Path:
    """A text file atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


__all__ = ["atomic_write", "save_json", "save_npz", "save_text", "save_torch"]


def json_sha256(obj) -> str:
    """Hash of a JSON-able value, independent of dict key order (values JSON cannot hold enter as their str)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Content hash of a file (checkpoints change whenever they are re-saved)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
