"""Test-session settings that must exist before torch is imported."""

import os
from pathlib import Path

import pytest

# OpenMP threads that spin while waiting for work steal the CPU from the other processes many tests start
# (torchrun workers, CLI subprocesses); sleeping instead keeps the suite fast on a 2-core machine.
# Subprocesses inherit it through the environment.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


SHARED_TIKTOKEN = Path(__file__).resolve().parents[2] / "shared" / "tiktoken"


@pytest.fixture
def tiktoken_cache(monkeypatch) -> Path:
    """TIKTOKEN_CACHE_DIR for the gpt2/r50k_base vocabularies: as set, else the shared cache beside the repo."""
    from gptmini.tokenizer import TokenizerError, build_tokenizer

    if not os.environ.get("TIKTOKEN_CACHE_DIR") and SHARED_TIKTOKEN.is_dir():
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(SHARED_TIKTOKEN))
    try:
        build_tokenizer("tiktoken", "gpt2")
    except TokenizerError as err:
        pytest.skip(f"the gpt2 vocabulary is unavailable offline (no TIKTOKEN_CACHE_DIR holding it): {err}")
    return Path(os.environ["TIKTOKEN_CACHE_DIR"])


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to run on the CPU described by the dict passed to the returned function (see cpu_helpers.py)."""
    import gptmini.device

    def use(caps: dict) -> None:
        monkeypatch.setattr(gptmini.device, "cpu_capabilities", lambda: caps)

    return use
