"""Benchmark loading a GPT-2 124M-sized Hugging Face folder into gptmini (`model.init_from`, `ckpt=gpt2`).

    python benchmarks/pretrained.py                 # 5 rounds, writes the `pretrained` section of RESULTS.md
    python benchmarks/pretrained.py --rounds 3 --no-write

A random `transformers.GPT2LMHeadModel` with the real gpt2 config (12 layers, 12 heads, 768 wide, 1024 positions,
50257 tokens) is saved with `save_pretrained` (model.safetensors, 498 MB in fp32) into a temporary folder outside
the repository, deleted at the end. The same weights are what `openai-community/gpt2` ships; only the values
differ, and loading time does not depend on them. Before anything is timed, gptmini's logits must match
transformers' within 1e-4.

Phases, each timed with time.perf_counter, median and best of `--rounds` rounds:
- read: `load_hf_gpt2(folder)`: config.json, safetensors into memory, Conv1D weights transposed (contiguous copies).
- build_gpt: `gptmini.pretrained.build_gpt(cfg, sd)`: GPT(cfg) with torch.nn.init's initialisers skipped, then
  `load_state_dict`; total = read + build_gpt, what `ckpt=gpt2` costs.
- the plain way, for comparison: `GPT(cfg)` (allocates and randomly initialises every parameter, twice: module
  defaults, then GPT.reset_parameters) and `load_state_dict`; total (plain) = read + both.
- transformers from_pretrained: `GPT2LMHeadModel.from_pretrained(folder)`, the same file.
The file sits in the page cache after it is written (warm reads); a cold read adds the disk's time for 498 MB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from _results import machine, write_section  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from gptmini import GPT  # noqa: E402
from gptmini.pretrained import build_gpt, load_hf_gpt2  # noqa: E402

GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    return p.parse_args(argv)


def make_folder(root: Path):
    """A random GPT-2 124M saved the way the hub's is; returns the model (eval) and its folder."""
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_124M)).eval()
    model.save_pretrained(root / "gpt2-random")
    return model, root / "gpt2-random"


def load_once(folder: Path) -> tuple[GPT, dict[str, float]]:
    """One gptmini load, phase by phase, then the same model built the plain way for comparison."""
    t0 = time.perf_counter()
    cfg, sd = load_hf_gpt2(str(folder))
    t1 = time.perf_counter()
    model = build_gpt(cfg, sd)
    t2 = time.perf_counter()
    plain = GPT(cfg)
    t3 = time.perf_counter()
    plain.load_state_dict(sd)
    t4 = time.perf_counter()
    phases = {"read": t1 - t0, "build_gpt": t2 - t1, "total": t2 - t0, "GPT(cfg)": t3 - t2,
              "load_state_dict": t4 - t3, "total (plain)": t1 - t0 + t4 - t2}
    return model.eval(), phases


def cross_check(ours: GPT, theirs, vocab: int) -> float:
    idx = torch.randint(0, vocab, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        delta = (ours(idx).logits - theirs(idx).logits).abs().max().item()
    if delta > 1e-4:
        sys.exit(f"gptmini's logits differ from transformers' by {delta:.2e}; not timing a wrong load")
    return delta


def time_transformers(folder: Path) -> float:
    import transformers

    t0 = time.perf_counter()
    transformers.GPT2LMHeadModel.from_pretrained(folder)
    return time.perf_counter() - t0


def markdown(times: dict[str, list[float]], args: argparse.Namespace, size_mb: float, delta: float) -> str:
    cmd = "python benchmarks/pretrained.py" + (f" --rounds {args.rounds}" if args.rounds != 5 else "")
    lines = [
        "## Loading pretrained GPT-2",
        "",
        f"`{cmd}` on {machine()}; {torch.get_num_threads()} threads.",
        "",
        f"- A random GPT2LMHeadModel with the gpt2 (124M) config, `save_pretrained` into a temporary folder: "
        f"model.safetensors {size_mb:.0f} MB (fp32), warm in the page cache. gptmini's logits matched "
        f"transformers' (max |Δ| {delta:.1e}) before timing.",
        "- read: `load_hf_gpt2` (config + safetensors + Conv1D transposes); build_gpt: GPT(cfg) without the random "
        "init, then `load_state_dict`; total: read + build_gpt. The plain way for comparison: `GPT(cfg)` (random "
        "init of every parameter) then `load_state_dict`. transformers: `GPT2LMHeadModel.from_pretrained` of the "
        f"same folder. Median and best of {args.rounds} rounds (time.perf_counter).",
        "",
        "| phase | median s | best s |",
        "|---|--:|--:|",
    ]
    for phase, values in times.items():
        lines.append(f"| {phase} | {statistics.median(values):.2f} | {min(values):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="gptmini-pretrained-"))
    try:
        reference, folder = make_folder(root)
        size_mb = (folder / "model.safetensors").stat().st_size / 1e6
        model, _ = load_once(folder)
        delta = cross_check(model, reference, GPT2_124M["vocab_size"])
        del model, reference
        times: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            model, phases = load_once(folder)
            del model
            phases["transformers from_pretrained"] = time_transformers(folder)
            for phase, seconds in phases.items():
                times.setdefault(phase, []).append(seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    table = markdown(times, args, size_mb, delta)
    print(table)
    if not args.no_write:
        write_section("pretrained", table)


if __name__ == "__main__":
    main()
