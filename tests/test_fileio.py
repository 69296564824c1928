"""The one atomic writer (fileio): whole files or none, no temp file left, the old file kept on failure."""

import json
import os

import numpy as np
import pytest
import torch

from fileio import atomic_write, save_json, save_npz, save_text, save_torch


def test_conveniences_round_trip_and_leave_only_the_file(tmp_path):
    save_torch({"x": torch.arange(3)}, tmp_path / "a" / "t.pt")  # the folder is made
    save_json({"b": 1, "a": [1, 2]}, tmp_path / "j.json", indent=1, sort_keys=True)
    save_npz(tmp_path / "n.npz", {"x": np.arange(4)})
    save_text("hello", tmp_path / "t.md")
    assert torch.equal(torch.load(tmp_path / "a" / "t.pt", weights_only=True)["x"], torch.arange(3))
    assert json.loads((tmp_path / "j.json").read_text()) == {"a": [1, 2], "b": 1}
    assert (tmp_path / "j.json").read_text().startswith('{\n "a"')  # the json.dump options reach it
    assert np.load(tmp_path / "n.npz")["x"].tolist() == [0, 1, 2, 3]  # no "n.npz.npz"
    assert (tmp_path / "t.md").read_text() == "hello"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "j.json", "n.npz", "t.md", "t.pt"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "j.json").stat().st_mode & 0o777 == 0o666 & ~umask  # as `open(path, "w")` makes it


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "f.json"
    save_json({"v": 1}, path)

    def half_then_crash(tmp):
        tmp.write_text('{"v": 2')  # half a file
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_crash)
    assert json.loads(path.read_text()) == {"v": 1} and [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_a_fixed_temp_name_replaces_what_a_killed_write_left(tmp_path):
    temp = tmp_path / ".f.tmp"
    temp.write_text("left by a killed run")
    atomic_write(tmp_path / "f", lambda tmp: tmp.write_text("new"), temp=temp)
    assert (tmp_path / "f").read_text() == "new" and not temp.exists()
