"""Atomic writes: a failure while writing leaves the old file whole and no temporary file behind."""
import json
from pathlib import Path

import numpy as np
import pytest

from core.files import json_default, replacing, save_arrays


def test_save_arrays_replaces_the_file_in_one_step(tmp_path):
    path = save_arrays(tmp_path / "a.npz", x=np.arange(3))
    save_arrays(path, x=np.arange(5))
    with np.load(path) as data:
        assert data["x"].tolist() == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = save_arrays(tmp_path / "a.npz", x=np.arange(3))
    with pytest.raises(RuntimeError), replacing(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    with np.load(path) as data:
        assert data["x"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"]


def test_json_default_writes_numpy_scalars_and_paths_and_refuses_the_rest():
    assert json.loads(json.dumps({"n": np.int64(3), "p": Path("/x")}, default=json_default)) == {"n": 3, "p": "/x"}
    with pytest.raises(TypeError, match="set"):
        json.dumps({1, 2}, default=json_default)
