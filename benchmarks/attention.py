"""Benchmark every attention variant: forward and forward+backward, eager and compiled, time and peak memory.

    python benchmarks/attention.py                # defaults for the device found (CUDA when available)
    python benchmarks/attention.py --device cpu -T 128 --variants sdpa flex --no-write

Every variant of `ATTENTION_REGISTRY` runs on the same weights (one state dict loaded into each; `gqa`, with
fewer key/value heads, gets its own) and is checked against `mha` in fp32 before anything is timed, so a broken
variant is never benchmarked. `gqa` uses n_kv_head = n_head // 4 (at least 2, else 1) and `swa` a window of
T // 4 unless told otherwise.

- fwd: eval mode under `torch.no_grad()`. fwd+bwd: training mode (dropout is 0), then the backward of a fixed
  random output gradient into the input and the weights. FlexAttention has no CPU backward: n/a there.
- Time: median over `--rounds` x `--iters` calls (CUDA events on GPU, `time.perf_counter` on CPU); each round
  times every variant in turn, `--warmup` untimed calls first, so that changes in the machine's load (other
  processes) hit all variants alike rather than whichever ran at the time.
- Peak memory: the most allocated during one call above what was allocated before it (weights, input): from
  `torch.cuda.max_memory_allocated` on GPU. The CPU allocator keeps no statistics, so on CPU the allocation
  events recorded by `torch.profiler(profile_memory=True)` are replayed in order (an untimed extra call; it
  reads a private profiler API and shows n/a if that ever breaks).
- Compiled rows (`torch.compile`) by default on CUDA only; CPU compilation is slow, `--compile` turns it on.
- `--options sinks gate+sinks`: each variant that reads those settings (model.attention.gate, .sinks) is timed
  again with them on, as rows `sdpa+sinks`, in the same rounds as its plain row (sink logits drawn at random).

The markdown table goes to stdout and into the `attention` section of benchmarks/RESULTS.md (`--no-write`: not).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import shlex
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch
from _results import machine, write_section  # benchmarks/ is on sys.path when run as a script

from gptmini.attention import ATTENTION_REGISTRY, Attention, build_attention, causal_keep_mask
from gptmini.config import AttentionConfig, ModelConfig

DEFAULTS = {
    "cuda": dict(batch=8, seq=1024, embd=768, heads=12, dtype="bf16", rounds=3, iters=20, warmup=5, compile=True),
    "cpu": dict(batch=4, seq=256, embd=256, heads=4, dtype="fp32", rounds=5, iters=10, warmup=2, compile=False),
}
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # None: plain fp32, no autocast
PASSES = ("fwd", "fwd+bwd")

Step = Callable[[], None]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=tuple(DEFAULTS), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("-B", "--batch", type=int, help="batch size (GPU 8, CPU 4)")
    p.add_argument("-T", "--seq", type=int, help="sequence length (GPU 1024, CPU 256)")
    p.add_argument("-d", "--embd", type=int, help="model width (GPU 768, CPU 256)")
    p.add_argument("--heads", type=int, help="attention heads (GPU 12, CPU 4)")
    p.add_argument("--kv-heads", type=int, help="gqa key/value heads (default n_head // 4, at least 2, else 1)")
    p.add_argument("--window", type=int, help="swa window (default T // 4)")
    p.add_argument("--dtype", choices=tuple(AUTOCAST), help="fp32, or bf16/fp16 autocast (GPU bf16, CPU fp32)")
    p.add_argument("--rounds", type=int, help="passes over all variants, round-robin (GPU 3, CPU 5)")
    p.add_argument("--iters", type=int, help="timed calls per variant and round (GPU 20, CPU 10)")
    p.add_argument("--warmup", type=int, help="untimed calls before those (GPU 5, CPU 2)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="also torch.compile (default: on CUDA)")
    p.add_argument("--variants", nargs="+", choices=tuple(ATTENTION_REGISTRY), default=list(ATTENTION_REGISTRY))
    p.add_argument("--options", nargs="+", default=[], metavar="OPTION[+OPTION]",
                   help="also time the variants that read them with these settings on: gate, sinks, gate+sinks")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.kv_heads is None:
        kv = max(args.heads // 4, 2)
        args.kv_heads = kv if args.heads % kv == 0 else 1
    args.window = args.window or max(args.seq // 4, 1)
    args.options = [tuple(item.split("+")) for item in args.options]
    for options in args.options:
        if not set(options) <= {"gate", "sinks"}:
            p.error(f"--options {'+'.join(options)}: only gate and sinks (joined by +) are options")
    # mha is the baseline of the speed columns and the reference of the cross-check, so it always runs (first).
    args.variants = ["mha"] + [name for name in dict.fromkeys(args.variants) if name != "mha"]
    return args


def model_config(args: argparse.Namespace, name: str, options: tuple[str, ...] = ()) -> ModelConfig:
    """The benchmark's shape; the key/value heads and the window go to the variants that read them."""
    reads = ATTENTION_REGISTRY[name].reads
    attention = AttentionConfig(
        name,
        n_kv_head=args.kv_heads if "n_kv_head" in reads else None,
        window=args.window if "window" in reads else None,
        gate="gate" in options, sinks="sinks" in options,
    )
    return ModelConfig(n_head=args.heads, n_embd=args.embd, block_size=args.seq, dropout=0.0, attention=attention)


def build_variants(args: argparse.Namespace, device: torch.device) -> dict[str, Attention]:
    """Every requested variant, all on one set of weights where the layout and shapes allow (not gqa's fewer
    key/value heads, nor the variants with parameters of their own); then, for each `--options` set, every variant
    that reads it, labelled `name+option`."""
    modules = {}
    for options in [(), *args.options]:
        torch.manual_seed(0)
        shared = build_attention(model_config(args, "mha", options)).state_dict()  # the canonical layout
        for name in args.variants:
            if not set(options) <= set(ATTENTION_REGISTRY[name].reads):
                continue
            torch.manual_seed(0)
            module = build_attention(model_config(args, name, options))
            mine = module.state_dict()
            if mine.keys() == shared.keys() and all(mine[k].shape == shared[k].shape for k in mine):
                module.load_state_dict(shared)  # every variant in mha's layout and shapes runs mha's weights
            if module.sinks is not None:
                with torch.no_grad():
                    module.sinks.copy_(torch.randn(args.heads, generator=torch.Generator().manual_seed(1)))
            modules["+".join((name, *options))] = module.to(device)
    return modules


def mha_reference(module: Attention, args: argparse.Namespace, device: torch.device) -> Attention:
    """An `mha` with `module`'s weights that computes what `module` should: gqa's key/value heads repeated over
    their query groups, swa's window added to the mask."""
    sd = module.state_dict()
    C, hd, kv = args.embd, args.embd // args.heads, module.n_kv_head
    for key in ("qkv.weight", "qkv.bias"):
        if key in sd:
            q, k, v = sd[key].split([C, kv * hd, kv * hd])
            k, v = (t.unflatten(0, (kv, hd)).repeat_interleave(args.heads // kv, dim=0).flatten(0, 1) for t in (k, v))
            sd[key] = torch.cat([q, k, v])
    options = tuple(key for key in ("gate", "sinks") if getattr(module.config.attention, key))
    reference = build_attention(model_config(args, "mha", options)).to(device)
    reference.load_state_dict(sd)
    if module.window is not None:
        reference.mask = ~causal_keep_mask(args.seq, args.seq, device, module.window)  # True = masked out
    return reference.eval()


def mha_equivalent(module: Attention) -> bool:
    """Whether `mha_reference` models this variant: mha itself, or mha with fewer key/value heads or a window.
    The others (latent, differential, linear attention) compute other functions and are pinned by their tests."""
    return module.weight_compatible or module.window is not None or module.n_kv_head != module.n_head


def cross_check(modules: dict[str, Attention], x: torch.Tensor, args: argparse.Namespace) -> None:
    """Raise unless every variant that mha models matches its `mha` reference in fp32."""
    with torch.no_grad():
        for name, module in modules.items():
            if not mha_equivalent(module):
                continue
            y, _ = module.eval()(x)
            expected, _ = mha_reference(module, args, x.device)(x)
            torch.testing.assert_close(
                y, expected, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name} disagrees with mha: {m}"
            )


def can_train(module: Attention, device: torch.device) -> bool:
    try:
        module.check_device(module.config, device, training=True)
    except ValueError:
        return False
    return True


def make_step(call: Callable, module: Attention, x: torch.Tensor, dy: torch.Tensor, args, backward: bool) -> Step:
    """One forward (eval, no_grad) or forward+backward (train) of `call`, which is `module` or its compiled self."""
    module.train(backward)
    amp = AUTOCAST[args.dtype]

    def step() -> None:
        with torch.set_grad_enabled(backward), torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            y, _ = call(x)
        if backward:
            y.backward(dy)
            module.zero_grad(set_to_none=True)  # freed here, so each step allocates (and counts) its gradients
            x.grad = None

    return step


def time_calls(step: Step, device: torch.device, iters: int, warmup: int) -> list[float]:
    """Milliseconds taken by each of `iters` calls of `step`, after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            step()
            times.append((time.perf_counter() - start_s) * 1e3)
    return times


@contextlib.contextmanager
def stderr_silenced() -> Iterator[None]:
    """Kineto writes two log lines per profiling session straight to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_mb(step: Step, device: torch.device) -> float | None:
    """Peak memory allocated during one call of `step` above what was allocated before it, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:  # replay the profiler's allocation (+) and free (-) events in time order
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile

        with stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        events, sizes = list(prof.profiler.kineto_results.experimental_event_tree()), []
        while events:
            event = events.pop()
            events.extend(event.children)
            if event.tag == _EventType.Allocation:
                sizes.append((event.start_time_ns, event.extra_fields.alloc_size))
    except Exception as error:  # a private API: report n/a rather than fail the benchmark
        print(f"CPU peak memory unavailable: {error!r}", file=sys.stderr)
        return None
    return max(itertools.accumulate((size for _, size in sorted(sizes)), initial=0)) / 2**20


def sweep(calls: dict[tuple[str, str], tuple[Callable, Attention]], x: torch.Tensor, dy: torch.Tensor, args) -> dict:
    """{(mode, variant): {pass: (median ms, peak MiB) or None where the variant cannot train on this device}}.

    The variants are timed round-robin, `args.rounds` times, so that drifts in the machine's load hit all alike.
    """
    samples: dict[tuple, list[float]] = defaultdict(list)
    peaks: dict[tuple, float | None] = {}
    for r in range(args.rounds):
        for key, (call, module) in calls.items():
            start = time.perf_counter()
            for p in PASSES:
                backward = p == "fwd+bwd"
                if backward and not can_train(module, x.device):
                    continue
                step = make_step(call, module, x, dy, args, backward)
                samples[key, p] += time_calls(step, x.device, args.iters, args.warmup)
                if r == 0:
                    peaks[key, p] = peak_mb(step, x.device)
            print(f"round {r + 1}/{args.rounds} {' '.join(key)}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return {
        key: {p: (statistics.median(samples[key, p]), peaks[key, p]) if samples[key, p] else None for p in PASSES}
        for key in calls
    }


def cache_bytes(module: Attention, seq: int) -> tuple[float, int]:
    """What one layer's decoding cache holds for one sequence, in fp32: bytes per token (from the sizes at `seq`
    and `2 * seq` positions) and the bytes that do not grow with length. Built on the meta device: nothing is
    allocated."""
    meta = torch.device("meta")
    short, long = (module.new_cache(1, n, meta, torch.float32).nbytes() for n in (seq, 2 * seq))
    per_token = (long - short) / seq
    return per_token, short - round(per_token * seq)


def cache_cell(module: Attention, seq: int) -> str:
    per_token, fixed = cache_bytes(module, seq)
    if per_token == 0:
        return f"0 (constant state, {fixed:,} B)"
    return f"{per_token:,.0f}" + (f" + {fixed:,} B" if fixed else "")


def markdown(results: dict[tuple[str, str], dict], args: argparse.Namespace, device: torch.device,
             modules: dict[str, Attention]) -> str:
    with_mode = args.compile  # a mode column only when there are compiled rows
    autocast = "fp32, no autocast" if AUTOCAST[args.dtype] is None else f"{args.dtype} autocast (fp32 weights, input)"
    compiled = "eager and torch.compile" if args.compile else "eager only (torch.compile: --compile)"
    timer = "CUDA events" if device.type == "cuda" else f"time.perf_counter, {torch.get_num_threads()} threads"
    memory = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "replay of torch.profiler allocations"
    header = ["variant", *(["mode"] if with_mode else []), "fwd ms", "fwd vs mha", "fwd+bwd ms", "fwd+bwd vs mha"]
    header += ["fwd peak MiB", "fwd+bwd peak MiB", "KV-cache bytes/token"]
    lines = [
        "## Attention variants",
        "",
        f"`{shlex.join(['python', 'benchmarks/attention.py', *sys.argv[1:]])}` on {machine()}.",
        "",
        f"- Shape: B={args.batch}, T={args.seq}, d={args.embd}, {args.heads} heads of {args.embd // args.heads}; "
        f"gqa n_kv_head={args.kv_heads}, swa window={args.window} (defaults: n_head//4 but at least 2; T//4).",
        f"- {autocast}; {compiled}; median of {args.rounds} rounds × {args.iters} calls, variants round-robin, "
        f"each after {args.warmup} warm-up calls ({timer}).",
        "- fwd: eval, no_grad. fwd+bwd: train mode, dropout 0, gradients of input and weights. "
        "Same weights everywhere a variant reads mha's layout (gqa its own); every variant that mha models (itself, "
        "fewer key/value heads, a window) matched mha in fp32 before timing; "
        f"the others ({', '.join(n for n, m in modules.items() if not mha_equivalent(m)) or 'none'}) are pinned "
        "to their papers' equations by their tests.",
        "- KV-cache bytes/token: what one layer's decoding cache grows by per generated token for one sequence, in "
        "fp32 (bf16 halves it), from the variant's own cache (`Attention.new_cache`); a constant state says so.",
        "- vs mha: mha time / variant time in the same mode (higher is faster). "
        f"Peak MiB: allocated above weights and input during one call ({memory}).",
        *([f"- Rows `name+option`: the variant with model.attention.<option>=true (random sink logits), timed in the "
             f"same rounds as its plain row: {', '.join('+'.join(o) for o in args.options)}."] if args.options else []),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * (1 + with_mode) + "--:|" * (len(header) - 1 - with_mode),
    ]
    for (mode, name), cells in results.items():
        base = results[mode, "mha"]
        row = [name, *([mode] if with_mode else [])]
        for p in PASSES:
            if cells[p] is None:
                row += [f"n/a (no {device.type.upper()} backward)", "–"]
            else:
                row += [f"{cells[p][0]:.2f}", f"{base[p][0] / cells[p][0]:.2f}×"]
        row += ["n/a" if cells[p] is None or cells[p][1] is None else f"{cells[p][1]:.1f}" for p in PASSES]
        row.append(cache_cell(modules[name], args.seq))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    modules = build_variants(args, device)
    x = torch.randn(args.batch, args.seq, args.embd, device=device, requires_grad=True)
    dy = torch.randn(args.batch, args.seq, args.embd, device=device, dtype=AUTOCAST[args.dtype] or torch.float32)
    cross_check(modules, x, args)
    modes = ("eager", "compiled") if args.compile else ("eager",)
    calls = {
        (mode, name): (torch.compile(module) if mode == "compiled" else module, module)
        for mode in modes
        for name, module in modules.items()
    }
    table = markdown(sweep(calls, x, dy, args), args, device, modules)
    print(table)
    if not args.no_write:
        write_section("attention", table)


if __name__ == "__main__":
    main()
