"""Shared by the data tests: small corpora made in tmp_path, and short ways to prepare and inspect them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from gptmini import data as data_lib
from gptmini.config import DataConfig
from gptmini.data import prepare

ROOT = Path(__file__).resolve().parents[1]
WORDS = "alpha beta gamma délta ε zeta η θ iota kappa λ mu".split()


def text_of(i: int, words: int = 30) -> str:
    """Document i: a unique header, then words drawn from a fixed list (some non-ASCII)."""
    rng = np.random.default_rng(i)
    return f"<doc {i:03d}>\n" + " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), words)) + f"\n</doc {i:03d}>\n"


def make_docs(folder: Path, n: int, suffix: str = ".txt") -> dict[Path, str]:
    folder.mkdir(parents=True, exist_ok=True)
    docs = {folder / f"doc_{i:03d}{suffix}": text_of(i) for i in range(n)}
    for path, text in docs.items():
        path.write_text(text, encoding="utf-8")
    return docs


def cfg_for(path: Path | str, **kw) -> DataConfig:
    return DataConfig(**{"name": "corpus", "source": "files", "path": str(path), **kw})


def run(cfg: DataConfig, data_dir: Path, **kw) -> tuple[data_lib.PreparedData, list[str]]:
    logs: list[str] = []
    return prepare(cfg, data_dir, log=logs.append, **kw), logs


def split_docs(prepared: data_lib.PreparedData, split: str) -> list[str]:
    """The documents of a split: its tokens cut at end-of-text, each decoded."""
    tokens = np.asarray(prepared._tokens(split))
    cuts = np.flatnonzero(tokens == prepared.tokenizer.eot_id)
    return [prepared.tokenizer.decode(piece.tolist()) for piece in np.split(tokens, cuts)]


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def prepared_then_changed(tmp_path: Path) -> tuple[Path, Path, dict[str, bytes]]:
    """A 10-document corpus prepared into tmp_path/data, then one source file changed (so the next prepare
    rewrites). Returns (data_dir, the dataset folder, its files' bytes before)."""
    make_docs(tmp_path / "corpus", 10)
    data = tmp_path / "data"
    run(cfg_for(tmp_path / "corpus"), data)
    out = data / "corpus"
    before = {name: (out / name).read_bytes() for name in listing(out)}
    (tmp_path / "corpus" / "doc_000.txt").write_text("changed\n")
    return data, out, before


def file_ids(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def assert_nothing_written(data_dir: Path) -> None:
    assert not data_dir.exists() or listing(data_dir) == []


def prepare_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run([sys.executable, "-m", "gptmini.data", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
