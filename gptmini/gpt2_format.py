"""What Hugging Face's GPT-2 format can hold, said once for both directions: `model.init_from=gpt2` and `ckpt=gpt2`
read it (gptmini.pretrained), `python -m gptmini.export` writes it (gptmini.export).

A GPT-2 is a gptmini GPT with learned positions, a GELU MLP, no QK-norm, uncapped logits and full multi-head
attention; its tensors have their own names (`key_map`) and its tokenizer is tiktoken's gpt2 vocabulary. The
tokenizer files are derived from that vocabulary here too, so reading checks a folder's vocab.json against the
same table writing produces.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from gptmini.attention import weight_compatible_variants
from gptmini.config import ModelConfig
from gptmini.tokenizer import TiktokenTokenizer

GPT2_POSITIONS = 1024  # n_positions of all four OpenAI sizes
GPT2_VOCAB = 50257
GPT2_TOKENIZERS = ("gpt2", "r50k_base")  # tiktoken names of the one GPT-2 vocabulary (identical definitions)
ENDOFTEXT = "<|endoftext|>"
# The MLPs GPT-2 can have: Hugging Face's activation_function -> model.mlp, and back (the first name wins).
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
HF_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu"}

# (Hugging Face name, gptmini name, transposed?) per layer, then for the whole model.
LAYER_KEYS = (("ln_1.weight", "ln_1.weight", False), ("ln_1.bias", "ln_1.bias", False),
              ("attn.c_attn.weight", "attn.qkv.weight", True), ("attn.c_attn.bias", "attn.qkv.bias", False),
              ("attn.c_proj.weight", "attn.out_proj.weight", True), ("attn.c_proj.bias", "attn.out_proj.bias", False),
              ("ln_2.weight", "ln_2.weight", False), ("ln_2.bias", "ln_2.bias", False),
              ("mlp.c_fc.weight", "mlp.fc.weight", True), ("mlp.c_fc.bias", "mlp.fc.bias", False),
              ("mlp.c_proj.weight", "mlp.proj.weight", True), ("mlp.c_proj.bias", "mlp.proj.bias", False))
MODEL_KEYS = (("wte.weight", "wte.weight", False), ("wpe.weight", "wpe.weight", False),
              ("ln_f.weight", "ln_f.weight", False), ("ln_f.bias", "ln_f.bias", False))


def key_map(n_layer: int) -> list[tuple[str, str, bool]]:
    """Every (Hugging Face name without `transformer.`, gptmini name, transposed?) of an n_layer GPT-2."""
    layers = [(f"h.{i}.{hf}", f"blocks.{i}.{ours}", t) for i in range(n_layer) for hf, ours, t in LAYER_KEYS]
    return [*MODEL_KEYS[:2], *layers, *MODEL_KEYS[2:]]


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every gptmini tensor of a GPT-2 with these sizes (checked before anything is built)."""
    C, V, P = cfg.n_embd, cfg.vocab_size, cfg.block_size
    per_layer = {"ln_1.weight": (C,), "ln_1.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
                 "attn.qkv.weight": (3 * C, C), "attn.qkv.bias": (3 * C,), "attn.out_proj.weight": (C, C),
                 "attn.out_proj.bias": (C,), "mlp.fc.weight": (4 * C, C), "mlp.fc.bias": (4 * C,),
                 "mlp.proj.weight": (C, 4 * C), "mlp.proj.bias": (C,)}
    shapes = {"wte.weight": (V, C), "wpe.weight": (P, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(cfg.n_layer):
        shapes.update({f"blocks.{i}.{name}": shape for name, shape in per_layer.items()})
    return shapes


def gpt2_refusal(cfg: ModelConfig) -> tuple[str, str] | None:
    """The first setting of `cfg` GPT-2's architecture cannot express, as (`key=value`, why: a phrase whose
    subject is GPT-2), or None. Callers word the sentence for their direction; the list is this one.

    Bias-free models are not refused: writing gives them zero biases, which compute the same thing (reading
    refuses them itself, since the weights' biases would be dropped)."""
    compatible = weight_compatible_variants()
    attention = cfg.attention  # a pattern (model.attention.layers) is refused when any of its layers differs
    shown = f"model.attention.name={attention.name}" if attention.layers is None else \
        f"model.attention.layers={attention.summary()}"
    refusals = [
        (cfg.pos_encoding != "learned", f"model.pos_encoding={cfg.pos_encoding}", "has learned positions only (wpe)"),
        (cfg.qk_norm, "model.qk_norm=true", "has no QK-norm"),
        (cfg.mlp not in HF_ACTIVATIONS, f"model.mlp={cfg.mlp}", "has a GELU MLP (exact or tanh)"),
        (cfg.logit_softcap is not None, f"model.logit_softcap={cfg.logit_softcap}", "does not cap logits"),
        (any(name not in compatible for name in attention.layer_names(cfg.n_layer)), shown,
         f"has full multi-head attention, as the variants {', '.join(compatible)} compute"),
        (cfg.attention.gate, "model.attention.gate=true", "has no output gate (its format holds no gate_proj)"),
        (cfg.attention.sinks, "model.attention.sinks=true", "has no attention sinks (its format holds no sinks)"),
    ]
    return next(((setting, why) for refused, setting, why in refusals if refused), None)


def is_gpt2_tokenizer(spec: Mapping[str, Any] | None) -> bool:
    """Whether a `Tokenizer.spec()` is tiktoken's GPT-2 vocabulary (gpt2, or r50k_base: the same encoding)."""
    return isinstance(spec, Mapping) and spec.get("kind") == "tiktoken" and spec.get("encoding") in GPT2_TOKENIZERS


# ----------------------------------------------------------------------------------------------------------
# The vocabulary as Hugging Face's files spell it


def byte_encoder() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes stand for themselves, the other 68
    (controls, space, ...) get the characters from U+0100 on, so every token is a visible string (Ġ = space)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(others)}}


@functools.lru_cache(maxsize=1)
def gpt2_ranks() -> dict[bytes, int]:
    """tiktoken gpt2's mergeable tokens (bytes -> id), through the public API; end-of-text is the id after them."""
    enc = TiktokenTokenizer("gpt2").enc
    if enc.n_vocab != GPT2_VOCAB or enc.eot_token != GPT2_VOCAB - 1:
        raise ValueError(f"tiktoken's gpt2 encoding has {enc.n_vocab} ids, end-of-text {enc.eot_token}; not GPT-2's")
    return {enc.decode_single_token_bytes(i): i for i in range(enc.eot_token)}


@functools.lru_cache(maxsize=1)
def gpt2_vocab() -> dict[str, int]:
    """vocab.json (OpenAI's encoder.json): each token as byte-encoder characters -> id, then <|endoftext|>."""
    encode = byte_encoder()
    vocab = {"".join(encode[b] for b in token): rank for token, rank in gpt2_ranks().items()}
    return vocab | {ENDOFTEXT: GPT2_VOCAB - 1}
