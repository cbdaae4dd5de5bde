"""The run-time samplers: random training windows and the whole-split evaluation windows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gptmini.data import BatchSampler, DataError, iter_windows

sys.path.insert(0, str(Path(__file__).parent))
from data_helpers import cfg_for, make_docs, run  # noqa: E402

# ----------------------------------------------------------------------------------------------------------
# Batches


def test_batch_shapes_and_shift_against_the_raw_tokens():
    tokens = np.random.default_rng(0).permutation(5000).astype(np.uint16)  # distinct: a value gives its position
    where = {int(t): i for i, t in enumerate(tokens)}
    sampler = BatchSampler(tokens, block_size=16, batch_size=6, seed=3)
    for _ in range(5):
        x, y = sampler.next_batch()
        assert x.shape == y.shape == (6, 16) and x.dtype == y.dtype == torch.int64
        for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
            start = where[row_x[0]]
            assert row_x == tokens[start : start + 16].tolist()
            assert row_y == tokens[start + 1 : start + 17].tolist()


def test_every_window_start_is_reachable():
    """Starts run from 0 to len - block_size - 1, so the first token is an input and the last one a target."""
    tokens = np.arange(20, dtype=np.uint16)
    sampler = BatchSampler(tokens, block_size=4, batch_size=8, seed=0)
    starts = set()
    for _ in range(100):
        x, y = sampler.next_batch()
        starts.update(x[:, 0].tolist())
        assert int(y.max()) <= 19
    assert starts == set(range(16))


def test_sampler_determinism_ranks_and_restore():
    tokens = np.random.default_rng(1).integers(0, 1000, 3000).astype(np.uint16)

    def draws(sampler: BatchSampler, n: int) -> list[torch.Tensor]:
        return [torch.stack(sampler.next_batch()) for _ in range(n)]  # (2, B, T)

    a = draws(BatchSampler(tokens, 32, 4, seed=7), 8)
    b = draws(BatchSampler(tokens, 32, 4, seed=7), 8)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    other_seed = draws(BatchSampler(tokens, 32, 4, seed=8), 8)
    assert not any(torch.equal(p, q) for p, q in zip(a, other_seed, strict=True))
    # ranks: each draws its own rows of the global batch, which is what one process with batch 4 * 3 draws
    ranks = [draws(BatchSampler(tokens, 32, 4, seed=7, rank=r, world_size=3), 8) for r in range(3)]
    whole = draws(BatchSampler(tokens, 32, 12, seed=7), 8)
    for step in range(8):
        assert not torch.equal(ranks[0][step], ranks[1][step]) and not torch.equal(ranks[1][step], ranks[2][step])
        assert torch.equal(torch.cat([ranks[r][step] for r in range(3)], dim=1), whole[step])
    with pytest.raises(DataError, match="rank 3 is outside world size 3"):
        BatchSampler(tokens, 32, 4, rank=3, world_size=3)
    # resume: a sampler restored from the state after 3 batches draws batches 4..8 of the uninterrupted run
    interrupted = BatchSampler(tokens, 32, 4, seed=7)
    draws(interrupted, 3)
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = BatchSampler(tokens, 32, 4, seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(p, q) for p, q in zip(draws(resumed, 5), a[3:], strict=True))
    assert resumed.state_dict() == {**state, "step": 8}


def test_sampler_on_prepared_memmap(tmp_path):
    make_docs(tmp_path / "corpus", 6)
    prepared, _ = run(cfg_for(tmp_path / "corpus", split="position"), tmp_path / "data")
    tokens = prepared.train_tokens()
    assert isinstance(tokens, np.memmap)
    x, y = BatchSampler(tokens, 8, 3, seed=0).next_batch()
    assert int(x.max()) < prepared.tokenizer.vocab_size and torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(DataError, match="fewer than block_size"):
        BatchSampler(tokens[:8], 8, 3)


def test_iter_windows_covers_every_target_once():
    tokens = np.arange(23, dtype=np.uint16)  # 22 positions with a next token
    batches = list(iter_windows(tokens, window=5, batch_size=2))
    expected_x = [[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], [[10, 11, 12, 13, 14], [15, 16, 17, 18, 19]], [[20, 21]]]
    assert [x.tolist() for x, _ in batches] == expected_x
    assert [y.tolist() for _, y in batches] == [[[t + 1 for t in row] for row in b] for b in expected_x]
    assert all(x.dtype == torch.int64 for x, _ in batches)
    targets = torch.cat([y.flatten() for _, y in batches]).tolist()
    assert targets == list(range(1, 23))
    # an exact multiple has no partial window; a single token has no target at all
    exact = list(iter_windows(np.arange(21), window=5, batch_size=3))
    assert [tuple(x.shape) for x, _ in exact] == [(3, 5), (1, 5)]
    assert list(iter_windows(np.arange(1), 5, 2)) == [] and list(iter_windows(np.arange(0), 5, 2)) == []


def test_iter_windows_keeps_a_last_window_of_one_target():
    """22 tokens are 21 positions: four windows of 5, then x=[[20]] -> y=[[21]], which must not be dropped."""
    batches = list(iter_windows(np.arange(22), window=5, batch_size=3))
    assert [tuple(x.shape) for x, _ in batches] == [(3, 5), (1, 5), (1, 1)]
    x, y = batches[-1]
    assert x.tolist() == [[20]] and y.tolist() == [[21]]
    assert torch.cat([y.flatten() for _, y in batches]).tolist() == list(range(1, 22))
