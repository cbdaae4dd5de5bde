"""Benchmark dataset preparation: MB of text per second for each tokenizer and number of processes.

    python benchmarks/data.py                       # char and gpt2, num_proc 1 and 2, on python_stdlib
    python benchmarks/data.py --tokenizers bytes --num-proc 1 --rounds 1 --no-write

The corpus is the `python_stdlib` dataset (this interpreter's standard library; its size in UTF-8 bytes is the
"MB" of every rate). Each measurement is a fresh preparation (`prepare(force=True)`) into its own temporary
`data_dir`, so nothing is reused between runs.

- prepare: the whole `prepare()` call: list and read the files, build the tokenizer (the char vocabulary
  needs a pass over the corpus), tokenize, write train.bin/val.bin/meta.json, re-open and check the result.
- tokenize: the tokenization step (`tokenize_documents`, the `Dataset.map` the preparation makes) timed inside
  that same `prepare()` call, and its share of it.
- Once per process before timing: `datasets` is imported and the gpt2 vocabulary loaded (tiktoken keeps it),
  so neither one-off start-up cost is counted.
- Median over `--rounds` rounds; each round runs every configuration in turn, so that changes in the machine's
  load hit them alike.

The markdown table goes to stdout and into the `data` section of benchmarks/RESULTS.md (`--no-write`: not).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _results import machine, write_section  # benchmarks/ is on sys.path when run as a script

from gptmini import data as data_lib
from gptmini.config import DataConfig
from gptmini.data import preparation
from gptmini.tokenizer import build_tokenizer

TOKENIZERS = {  # name in the table: (data.tokenizer, data.encoding)
    "char": ("char", "gpt2"),
    "bytes": ("bytes", "gpt2"),
    "gpt2": ("tiktoken", "gpt2"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizers", nargs="+", choices=tuple(TOKENIZERS), default=["char", "gpt2"])
    p.add_argument("--num-proc", nargs="+", type=int, default=[1, 2], help="Dataset.map processes (default 1 2)")
    p.add_argument("--rounds", type=int, default=3, help="passes over all configurations (default 3)")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    return p.parse_args(argv)


def quiet(_: str) -> None:
    pass


def time_prepare(cfg: DataConfig) -> tuple[float, float, dict]:
    """Seconds for one fresh preparation, the seconds of its tokenization step within it, and its meta.json."""
    tokenize = preparation.tokenize_documents
    inside: list[float] = []

    def timed_tokenize(*args, **kwargs):  # the Dataset.map call prepare() makes (eager for a Dataset)
        start = time.perf_counter()
        result = tokenize(*args, **kwargs)
        inside.append(time.perf_counter() - start)
        return result

    preparation.tokenize_documents = timed_tokenize  # prepare() looks it up in its own module at call time
    try:
        with tempfile.TemporaryDirectory(prefix="gptmini-bench-data-") as data_dir:
            start = time.perf_counter()
            prepared = data_lib.prepare(cfg, data_dir, log=quiet, force=True)
            seconds = time.perf_counter() - start
    finally:
        preparation.tokenize_documents = tokenize
    assert len(inside) == 1
    return seconds, inside[0], prepared.meta


def measure(configs: dict, rounds: int) -> tuple[dict, dict, dict]:
    """prepare and tokenize seconds per configuration, one list entry per round, and each one's meta.json."""
    prepare_s: dict = {key: [] for key in configs}
    tokenize_s: dict = {key: [] for key in configs}
    metas: dict = {}
    for round_ in range(rounds):
        for key, cfg in configs.items():
            seconds, tokenizing, metas[key] = time_prepare(cfg)
            prepare_s[key].append(seconds)
            tokenize_s[key].append(tokenizing)
            print(f"round {round_ + 1}/{rounds} {key[0]} num_proc={key[1]}: prepare {seconds:.2f} s, "
                  f"of which tokenize {tokenizing:.2f} s", file=sys.stderr)
    return prepare_s, tokenize_s, metas


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import datasets

    datasets.disable_progress_bars()
    if "gpt2" in args.tokenizers:
        shared = Path(__file__).resolve().parents[2] / "shared" / "tiktoken"  # an offline cache beside the checkout
        if not os.environ.get("TIKTOKEN_CACHE_DIR") and shared.is_dir():
            os.environ["TIKTOKEN_CACHE_DIR"] = str(shared)
        build_tokenizer("tiktoken", "gpt2")  # tiktoken keeps the loaded vocabulary for the process
    _, files = data_lib.stdlib_files()
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    configs = {
        (name, n): DataConfig(name="bench", source="python_stdlib", tokenizer=TOKENIZERS[name][0],
                              encoding=TOKENIZERS[name][1], num_proc=n)
        for name in args.tokenizers
        for n in args.num_proc
    }
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # other processes share the CPU
    prepare_s, tokenize_s, metas = measure(configs, args.rounds)
    table = results_table(args, len(files), megabytes, load, prepare_s, tokenize_s, metas)
    print(table)
    if not args.no_write:
        write_section("data", table)


def results_table(args: argparse.Namespace, n_files: int, megabytes: float, load: float | None, prepare_s: dict,
                  tokenize_s: dict, metas: dict) -> str:
    """The markdown section for RESULTS.md: how it was measured, then one row per configuration (medians)."""
    rows = []
    for key in prepare_s:
        meta = metas[key]
        tokens = meta["train_tokens"] + meta["val_tokens"]
        p, t = statistics.median(prepare_s[key]), statistics.median(tokenize_s[key])
        share = statistics.median(b / a for a, b in zip(prepare_s[key], tokenize_s[key], strict=True))
        rows.append(f"| {key[0]} | {key[1]} | {meta['vocab_size']:,} | {tokens / 1e6:.2f} M | {p:.2f} | "
                    f"{megabytes / p:.2f} | {t:.2f} | {megabytes / t:.2f} | {share:.0%} |")
    return "\n".join([
        "## Data preparation",
        "",
        f"`{shlex.join(['python', 'benchmarks/data.py', *sys.argv[1:]])}` on {machine()}.",
        "",
        f"- Corpus: `python_stdlib`, {n_files} files, {megabytes:.2f} MB of UTF-8 text; a fresh preparation "
        f"(`prepare(force=True)`) into an empty temporary data_dir each time; median of {args.rounds} rounds, "
        f"configurations round-robin.",
        *([f"- 1-minute load average at the start: {load:.1f} (other processes on the machine skew the figures)."]
          if load is not None else []),
        "- prepare: the whole `prepare()` call (list and read files, build the tokenizer, tokenize, write and "
        "check train.bin/val.bin/meta.json); `datasets` imported and the gpt2 vocabulary loaded beforehand.",
        "- tokenize: the tokenization step within that same call (`tokenize_documents`, the `Dataset.map` over "
        "the documents, timed around it); share: its part of the prepare time (median of the per-run shares).",
        "- num_proc=2 forks worker processes and passes shards through temporary Arrow files; tiktoken's "
        "`encode_ordinary_batch` already runs on several threads with num_proc=1.",
        "",
        "| tokenizer | num_proc | vocab | tokens | prepare s | prepare MB/s | tokenize s | tokenize MB/s | share |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
        *rows,
    ])


if __name__ == "__main__":
    main()
