"""Sampling from a checkpoint, as a library: `load_for_inference` and `run_generation(config)`.

The model, its tokenizer and vocabulary all come from the checkpoint; the data folder is not needed.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, TextIO

import torch

from gptmini.attention import WEIGHT_COMPATIBLE
from gptmini.checkpoint import CheckpointError, find_checkpoint, load_checkpoint
from gptmini.config import AttentionConfig, GenerateConfig, ModelConfig
from gptmini.device import autocast, resolve_device, resolve_dtype
from gptmini.model import GPT
from gptmini.sampling import generate_stream
from gptmini.tokenizer import Tokenizer, tokenizer_from_spec

SEPARATOR = "\n\n---\n\n"  # between samples, on stdout and in the `out` file
_MAX_HELD_TOKENS = 4  # a UTF-8 character spans at most 4 byte-level tokens


def load_for_inference(
    ckpt: str | Path, device: torch.device | str = "cpu", attention: AttentionConfig | None = None
) -> tuple[GPT, Tokenizer]:
    """Rebuild model and tokenizer from a checkpoint, optionally running it with another attention variant.

    Only weight-compatible variants can stand in for one another (see gptmini.attention); anything else is
    refused with a one-line error, as is a checkpoint whose tensors do not fit its own config.
    """
    path = find_checkpoint(ckpt)
    state = load_checkpoint(path)
    try:
        model_cfg = ModelConfig(**state["config"]["model"])
        tokenizer = tokenizer_from_spec(state["tokenizer"])
        weights = state["model"]
        if not isinstance(weights, dict):
            raise TypeError(f"'model' holds a {type(weights).__name__}, not a state dict")
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{str(path)!r} lacks a valid model config, tokenizer or weights ({err})") from None
    if attention is not None:
        model_cfg = dataclasses.replace(model_cfg, attention=_swap_attention(model_cfg.attention, attention))
    model = GPT(model_cfg)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).strip().splitlines()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise CheckpointError(f"{str(path)!r}: its tensors do not fit its config ({detail})") from None
    return model.to(device).eval(), tokenizer


def _swap_attention(trained: AttentionConfig, wanted: AttentionConfig) -> AttentionConfig:
    """The attention config to run with: `wanted` when it can load weights trained with `trained`."""
    if wanted.name == trained.name:
        if wanted.n_kv_head != trained.n_kv_head:
            raise ValueError(
                f"model.attention.n_kv_head={wanted.n_kv_head} does not match the checkpoint's "
                f"n_kv_head={trained.n_kv_head}; key/value heads are fixed by the weights"
            )
        return wanted
    if wanted.name not in WEIGHT_COMPATIBLE or trained.name not in WEIGHT_COMPATIBLE:
        raise ValueError(
            f"model/attention={wanted.name} cannot run weights trained with {trained.name!r}: only these "
            f"variants are interchangeable: {', '.join(WEIGHT_COMPATIBLE)}"
        )
    return wanted


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
    return path.read_text()


def run_generation(cfg: GenerateConfig, stream: TextIO | None = sys.stdout) -> list[str]:
    """Sample `num_samples` continuations as one batch; return prompt + continuation for each.

    The first sample streams to `stream` token by token as it is decoded, the others follow it once done,
    separated by SEPARATOR; `cfg.out` receives the same text. An empty prompt starts from end-of-text, as a
    fresh document does in training.
    """
    cfg.validate()
    try:
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
    except ValueError as err:  # its messages name the train.* keys; here the keys are top-level
        raise ValueError(str(err).replace("train.", "")) from None
    model, tokenizer = load_for_inference(cfg.ckpt, device, cfg.model.attention)
    prompt = read_prompt(cfg)
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
    idx = torch.tensor([ids] * cfg.num_samples, dtype=torch.long, device=device)  # (N, T)

    if cfg.attention_map or cfg.attention_tb:
        from gptmini.attention_maps import save_prompt_attention

        if len(ids) > model.config.block_size:
            print(f"note: the attention map shows the prompt's last {model.config.block_size} tokens "
                  f"(model.block_size)", file=sys.stderr)
        with autocast(device, dtype):
            save_prompt_attention(model, tokenizer, idx[:1], cfg.attention_map, cfg.attention_tb,
                                  cfg.attention_layers, cfg.attention_heads)

    if cfg.compile:
        model = compile_for_generation(model, device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    rows = [Continuation(tokenizer, cfg.stop) for _ in range(cfg.num_samples)]
    write = _writer(stream)
    write(prompt)
    with autocast(device, dtype):
        tokens = generate_stream(model, idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                 top_p=cfg.top_p, generator=gen, kv_cache=cfg.kv_cache)
        for token in tokens:  # (N, 1)
            for row, tok in zip(rows, token[:, 0].tolist(), strict=True):
                released = row.feed(tok)
                if row is rows[0]:
                    write(released)
            if all(row.done for row in rows):
                break
    write(rows[0].finish())
    for row in rows[1:]:
        row.finish()
    samples = [prompt + row.text for row in rows]
    for sample in samples[1:]:
        write(SEPARATOR + sample)
    write("\n")
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(SEPARATOR.join(samples) + "\n")
    return samples


def compile_for_generation(model: GPT, device: torch.device) -> Any:
    """torch.compile the model for decoding; a clear error where compilation cannot work."""
    if device.type == "cpu":
        import shutil

        if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang", "g++", "c++")):
            raise ValueError("compile=true on CPU needs a C++ compiler (none found on PATH); use compile=false")
    return torch.compile(model, dynamic=True)


def _writer(stream: TextIO | None):
    def write(text: str) -> None:
        if stream is not None and text:
            stream.write(text)
            stream.flush()

    return write
