"""Checkpoints: atomic writes, weights_only loading, and rejection of files that are not ours."""

from __future__ import annotations

import pickle

import pytest
import torch

from gptmini.checkpoint import CheckpointError, find_checkpoint, load_checkpoint, save_checkpoint


def test_roundtrip(tmp_path):
    state = {"model": {"w": torch.arange(6.0)}, "step": 3, "config": {"model": {"n_layer": 2}}}
    save_checkpoint(state, tmp_path / "c" / "last.pt")
    loaded = load_checkpoint(tmp_path / "c" / "last.pt")
    assert loaded["step"] == 3 and torch.equal(loaded["model"]["w"], torch.arange(6.0))
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["last.pt"]  # no temporary file left


def test_interrupted_save_leaves_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device (disk full)")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(CheckpointError, match="disk full.*previous checkpoint there is intact"):
        save_checkpoint({"step": 2}, path)
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_malicious_pickle_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"format": "gptmini-checkpoint", "version": 1, "x": Exploit()}, path)
    with pytest.raises(CheckpointError, match="not a readable gptmini checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw)
    assert not marker.exists()


def test_truncated_and_foreign_files(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint({"model": {"w": torch.randn(100, 100)}}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a gptmini checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_find_checkpoint_prefers_best(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    save_checkpoint({}, tmp_path / "checkpoints" / "last.pt")
    assert find_checkpoint(tmp_path).name == "last.pt"
    save_checkpoint({}, tmp_path / "checkpoints" / "best.pt")
    assert find_checkpoint(tmp_path).name == "best.pt"
    with pytest.raises(CheckpointError, match="has no checkpoints"):
        find_checkpoint(tmp_path / "checkpoints")
