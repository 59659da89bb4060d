"""Files written so that a crash never leaves half of one, and the JSON hook for numpy values.

A reader (the dashboard, a second process) sees the old file or the new one: each is written beside its
destination and moved over it in one step.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; it replaces `path` when the block ends without an error
    and is removed when it ends with one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_arrays(path: str | Path, **arrays: np.ndarray) -> Path:
    """Named arrays as one .npz file, written atomically."""
    path = Path(path)
    with replacing(path) as tmp, open(tmp, "wb") as f:   # np.savez appends .npz to a name, not to a file object
        np.savez(f, **arrays)
    return path


def json_default(value):
    """`json.dumps(default=json_default)`: numpy scalars as Python numbers, paths as strings."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
