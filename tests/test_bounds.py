"""Resource bounds (issue 21, item 10): a request that cannot fit is refused in one line before it allocates."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from gptmini import generate_command
from gptmini.config import GenerateConfig, ModelConfig
from gptmini.generate_command import check_sample_memory, sample_bytes
from gptmini.model import GPT

sys.path.insert(0, str(Path(__file__).parent))


def tiny() -> GPT:
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=50))


def test_sample_bytes_counts_ids_kv_cache_and_logits():
    # 8 bytes per id; keys and values of 2 layers x 16 dims over a window of min(10 + 30, 32) = 32; 2 x 50 logits.
    assert sample_bytes(tiny(), 10, 30) == 8 * 40 + 2 * 2 * 32 * 16 * 4 + 2 * 50 * 4


def test_num_samples_beyond_free_memory_is_refused(monkeypatch):
    model = tiny()
    per_row = sample_bytes(model, 5, 20)
    monkeypatch.setattr(generate_command, "available_memory", lambda device: 1000 * per_row)
    check_sample_memory(GenerateConfig(ckpt="x", num_samples=1000, max_new_tokens=20), model, 5, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"^num_samples=1001 needs at least .* GiB .* free on cpu"):
        check_sample_memory(GenerateConfig(ckpt="x", num_samples=1001, max_new_tokens=20), model, 5,
                            torch.device("cpu"))
    monkeypatch.setattr(generate_command, "available_memory", lambda device: None)  # unknown: no bound
    check_sample_memory(GenerateConfig(ckpt="x", num_samples=10**9, max_new_tokens=20), model, 5,
                        torch.device("cpu"))
