"""Sampling from a checkpoint, as a library: `run_generation(config)` (the checkpoint is read by
`gptmini.checkpoint.load_for_inference`).

The model, its tokenizer and vocabulary all come from the checkpoint; the data folder is not needed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import torch
from torch import Tensor

from gptmini.checkpoint import load_for_inference
from gptmini.config import GenerateConfig
from gptmini.device import autocast, available_memory, dtype_choice, resolve_device
from gptmini.model import GPT
from gptmini.paths import check_output_file, check_writable, write_atomic
from gptmini.sampling import generate_stream
from gptmini.tokenizer import Tokenizer

SEPARATOR = "\n\n---\n\n"  # between samples, on stdout and in the `out` file
_MAX_HELD_TOKENS = 4  # a UTF-8 character spans at most 4 byte-level tokens


class Continuation:
    """One sample's new text, decoded as tokens arrive, cut at end-of-text or at the stop string.

    Constant work per token however long the text grows: a token is decoded alone (held back while it is
    part of an unfinished UTF-8 character), and the stop string is looked for only where it could newly
    appear. Text that might be the start of the stop string is held back too, so a stream never shows a
    stop string, nor half of one.
    """

    def __init__(self, tokenizer: Tokenizer, stop: str | None = None) -> None:
        self.tokenizer, self.stop = tokenizer, stop or None
        self.pending: list[int] = []  # tokens of an unfinished character
        self.held = ""  # decoded text that may begin the stop string
        self.chunks: list[str] = []  # released text
        self.done = False

    @property
    def text(self) -> str:
        """The text released so far."""
        return "".join(self.chunks)

    def feed(self, token: int) -> str:
        """Take one new token; return the text it releases (possibly empty)."""
        if self.done:
            return ""
        if token == self.tokenizer.eot_id:
            return self.finish()
        self.pending.append(token)
        piece = self.tokenizer.decode(self.pending)
        if piece.endswith("\ufffd") and len(self.pending) < _MAX_HELD_TOKENS:
            return ""  # maybe the first bytes of a character
        self.pending = []
        text = self.held + piece
        if self.stop is None:
            return self._release(text)
        cut = text.find(self.stop)  # an earlier match would have been found at an earlier token
        if cut >= 0:
            self.done = True
            self.held = ""
            return self._release(text[:cut])
        keep = next((k for k in range(min(len(self.stop) - 1, len(text)), 0, -1) if text.endswith(self.stop[:k])), 0)
        self.held = text[len(text) - keep :]
        return self._release(text[: len(text) - keep])

    def finish(self) -> str:
        """No more tokens: release what was held back (the stop string never completed)."""
        if self.done:
            return ""
        self.done = True
        text = self.held + (self.tokenizer.decode(self.pending) if self.pending else "")
        self.pending, self.held = [], ""
        return self._release(text)

    def _release(self, text: str) -> str:
        if text:
            self.chunks.append(text)
        return text


def read_prompt(cfg: GenerateConfig) -> str:
    if cfg.prompt_file is None:
        return cfg.prompt
    path = Path(cfg.prompt_file)
    if not path.is_file():
        raise FileNotFoundError(f"prompt_file={cfg.prompt_file!r} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"prompt_file={cfg.prompt_file!r} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
            f"{err.start}); save the prompt as UTF-8"
        ) from None


def run_generation(cfg: GenerateConfig, stream: TextIO | None = sys.stdout) -> list[str]:
    """Sample `num_samples` continuations as one batch; return prompt + continuation for each.

    The first sample streams to `stream` token by token as it is decoded, the others follow it once done,
    separated by SEPARATOR; `cfg.out` receives the same text. An empty prompt starts from end-of-text, as a
    fresh document does in training.
    """
    cfg.validate()
    device = resolve_device(cfg.device, key="device")
    dtype_choice(cfg.dtype, device, key="dtype")  # a bad value fails before anything loads
    if cfg.compile:
        check_compiler(device)
    for key in ("out", "attention_map"):  # before sampling: a long sample is not lost at the end
        if getattr(cfg, key):
            check_output_file(getattr(cfg, key), key, reads=(cfg.ckpt, cfg.prompt_file))
    if cfg.attention_tb:
        check_writable(cfg.attention_tb, "attention_tb", folder=True)
    prompt = read_prompt(cfg)
    model, tokenizer, _, _ = load_for_inference(cfg.ckpt, device, cfg.model.attention)
    dtype, why = dtype_choice(cfg.dtype, device, model.config.n_embd, key="dtype")
    if cfg.dtype == "auto":  # on stderr: stdout is the sample
        print(f"dtype: {str(dtype).removeprefix('torch.')} ({why})", file=sys.stderr)
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
    check_sample_memory(cfg, model, len(ids), device)
    idx = torch.tensor([ids] * cfg.num_samples, dtype=torch.long, device=device)  # (N, T)

    with autocast(device, dtype):
        if cfg.attention_map or cfg.attention_tb:
            save_attention(cfg, model, tokenizer, idx[:1])
        write = _writer(stream)
        write(prompt)
        rows = sample_rows(cfg, model, tokenizer, idx, write)
    write(rows[0].finish())
    for row in rows[1:]:
        row.finish()
    samples = [prompt + row.text for row in rows]
    for sample in samples[1:]:
        write(SEPARATOR + sample)
    write("\n")
    if cfg.out:
        write_atomic(cfg.out, (SEPARATOR.join(samples) + "\n").encode(), "out")
    return samples


def sample_bytes(model: GPT, prompt_tokens: int, new_tokens: int, elem: int = 4) -> int:
    """A lower bound on the memory one more row of a batch costs: its token ids, its KV cache (every layer's cache
    over the window, as each variant lays it out: measured on the meta device, which allocates nothing) and its
    logits and probabilities over the vocabulary at one position."""
    c = model.config
    window = min(prompt_tokens + new_tokens, c.block_size)
    cache = model.make_kv_cache(1, window, device="meta", dtype=torch.float32).nbytes() * elem // 4
    return 8 * (prompt_tokens + new_tokens) + cache + 2 * c.vocab_size * elem


def check_sample_memory(cfg: GenerateConfig, model: GPT, prompt_tokens: int, device: torch.device) -> None:
    """Refuse a batch of samples that cannot fit before allocating it (a huge num_samples ran out of memory after
    a minute); where free memory cannot be read, no bound is applied."""
    free = available_memory(device)
    need = cfg.num_samples * sample_bytes(model, prompt_tokens, cfg.max_new_tokens)
    if free is not None and need > free:
        raise ValueError(
            f"num_samples={cfg.num_samples} needs at least {need / 2**30:,.1f} GiB for its tokens, KV cache and "
            f"logits, more than the {free / 2**30:,.1f} GiB free on {device.type}; ask for fewer samples at a time"
        )


def save_attention(cfg: GenerateConfig, model: GPT, tokenizer: Tokenizer, idx: Tensor) -> None:
    """The prompt's attention maps, idx (1, T), as an image (`attention_map`) and/or TensorBoard (`attention_tb`)."""
    from gptmini.attention_maps import save_prompt_attention

    if idx.size(1) > model.config.block_size:
        print(f"note: the attention map shows the prompt's last {model.config.block_size} tokens "
              f"(model.block_size)", file=sys.stderr)
    save_prompt_attention(model, tokenizer, idx, cfg.attention_map, cfg.attention_tb, cfg.attention_layers,
                          cfg.attention_heads, cfg.attention_scale)
    for what, where in (("attention map", cfg.attention_map), ("attention maps for TensorBoard", cfg.attention_tb)):
        if where:
            print(f"{what}: {where}", file=sys.stderr)


def sample_rows(cfg: GenerateConfig, model: GPT, tokenizer: Tokenizer, idx: Tensor,
                write: Callable[[str], None]) -> list[Continuation]:
    """Decode idx (N, T) as one batch until every row is done; the first row's text goes to `write` as it comes."""
    # compile=true: a compiled decode step over a static KV cache where the variant has one (the sdpa family),
    # else the whole model compiled for any shape.
    compiled_decode = cfg.compile and cfg.kv_cache and all(block.attn.static_cache for block in model.blocks)
    if cfg.compile and not compiled_decode:
        model = torch.compile(model, dynamic=True)
    gen = torch.Generator(device=idx.device).manual_seed(cfg.seed)
    rows = [Continuation(tokenizer, cfg.stop) for _ in range(idx.size(0))]
    tokens = generate_stream(model, idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                             top_p=cfg.top_p, generator=gen, kv_cache=cfg.kv_cache, compile=compiled_decode)
    for token in tokens:  # (N, 1)
        for row, tok in zip(rows, token[:, 0].tolist(), strict=True):
            released = row.feed(tok)
            if row is rows[0]:
                write(released)
        if all(row.done for row in rows):
            break
    return rows


def check_compiler(device: torch.device) -> None:
    """torch.compile on CPU needs a C++ compiler: a clear error instead of Inductor's traceback."""
    if device.type == "cpu":
        import shutil

        if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang", "g++", "c++")):
            raise ValueError("compile=true on CPU needs a C++ compiler (none found on PATH); use compile=false")


def _writer(stream: TextIO | None):
    def write(text: str) -> None:
        if stream is not None and text:
            stream.write(text)
            stream.flush()

    return write
