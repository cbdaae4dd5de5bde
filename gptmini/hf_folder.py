"""A Hugging Face GPT-2 folder as files: config.json and the weight files, read without trusting them.

Nothing here builds a model: what the files claim is checked against what they hold first (sizes against bytes,
types of the config's fields, regular files only), so a hostile or broken folder costs one line, not gigabytes of
allocations or a read that never returns. gptmini.pretrained turns what this returns into a GPT.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gptmini.config import AttentionConfig, ModelConfig
from gptmini.gpt2_format import ACTIVATIONS

WEIGHT_FILES = (("model.safetensors", "model.safetensors.index.json"),
                ("pytorch_model.bin", "pytorch_model.bin.index.json"))

class PretrainedError(ValueError):
    """A pretrained reference that cannot be resolved, read or served; always one line."""


def brief(err: BaseException, limit: int = 160) -> str:
    """An exception as `Type: message` on one line, cut at a word boundary (library messages run for lines)."""
    text = " ".join(str(err).split())
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# ----------------------------------------------------------------------------------------------------------
# Reading config and weights


def read_hf_config(folder: Path, where: str) -> dict[str, Any]:
    """config.json as a dict; one line when it is unreadable or not GPT-2's."""
    _check_regular(folder / "config.json", where)
    try:
        hf = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise PretrainedError(f"{where}: config.json is unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(hf, dict) or hf.get("model_type") != "gpt2":
        found = hf.get("model_type") if isinstance(hf, dict) else type(hf).__name__
        raise PretrainedError(f"{where}: config.json describes model_type={found!r}, not gpt2; only GPT-2 loads")
    return hf


def hf_model_config(hf: Mapping[str, Any], where: str, attention: AttentionConfig | None = None) -> ModelConfig:
    """The gptmini ModelConfig of a GPT-2 config.json, refusing (one line) any setting gptmini cannot reproduce."""
    eps = hf.get("layer_norm_epsilon", 1e-5)
    refusals = [
        (hf.get("activation_function", "gelu_new") not in ACTIVATIONS,
         f"activation_function={hf.get('activation_function')!r} (gptmini has {', '.join(ACTIVATIONS)})"),
        (not isinstance(eps, (int, float)) or not math.isclose(eps, 1e-5, rel_tol=1e-6),
         f"layer_norm_epsilon={eps!r} (gptmini's layer norms use 1e-5)"),
        (hf.get("tie_word_embeddings", True) is not True, "tie_word_embeddings=false (gptmini ties the LM head)"),
        (hf.get("n_inner") not in (None, 4 * hf.get("n_embd", 0)), f"n_inner={hf.get('n_inner')} (gptmini: 4*n_embd)"),
        (hf.get("scale_attn_weights", True) is not True, "scale_attn_weights=false (gptmini scales by 1/sqrt(hd))"),
        (hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx=true"),
        (hf.get("add_cross_attention", False), "add_cross_attention=true"),
    ]
    for refused, what in refusals:
        if refused:
            raise PretrainedError(f"{where}: config.json sets {what}; gptmini cannot reproduce this GPT-2")
    _check_sizes(hf, where)
    try:
        return ModelConfig(
            n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], block_size=hf["n_positions"],
            vocab_size=hf["vocab_size"], dropout=0.0, bias=True, pos_encoding="learned",
            attention=attention or AttentionConfig(), mlp=ACTIVATIONS[hf.get("activation_function", "gelu_new")],
        )
    except KeyError as err:
        raise PretrainedError(f"{where}: config.json lacks {err.args[0]!r}") from None
    except ValueError as err:
        raise PretrainedError(f"{where}: config.json does not make a valid model ({err})") from None


def weight_files(folder: Path, where: str) -> list[Path]:
    """The files holding the folder's tensors: model.safetensors (or its shards), else pytorch_model.bin (or
    its shards); each a regular file beside config.json."""
    for single, index in WEIGHT_FILES:
        _check_regular(folder / single, where)
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            return _shards(folder, index, where)
    raise PretrainedError(f"{where}: no model.safetensors or pytorch_model.bin; not a Hugging Face GPT-2 folder")


def read_hf_weights(folder: Path, where: str) -> dict[str, Tensor]:
    """All tensors of the folder's weight files; pytorch_model.bin through `torch.load(weights_only=True)`, which
    refuses anything but tensors and plain containers."""
    tensors: dict[str, Tensor] = {}
    for path in weight_files(folder, where):
        tensors.update(_read_tensor_file(path, where))
    return tensors


def _shards(folder: Path, index: str, where: str) -> list[Path]:
    try:
        weight_map = json.loads((folder / index).read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise PretrainedError(f"{where}: {index} is unreadable ({type(err).__name__})") from None
    if any(not isinstance(n, str) or Path(n).name != n for n in names):  # shards live beside the index, nowhere else
        raise PretrainedError(f"{where}: {index} names shard files outside the folder")
    for name in names:
        _check_regular(folder / name, where)
    return [folder / n for n in names]


def _read_tensor_file(path: Path, where: str) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated file, a foreign pickle weights_only refuses, ...
        raise PretrainedError(f"{where}: cannot read {path.name} as tensors ({brief(err)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise PretrainedError(f"{where}: {path.name} does not hold a flat state dict of tensors")
    return state


SIZES = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")


def _check_sizes(hf: Mapping[str, Any], where: str) -> None:
    """Each size a positive integer (a null, a list or 1e3 would otherwise fail deep inside the model)."""
    for key in SIZES:
        value = hf.get(key)
        if key in hf and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise PretrainedError(f"{where}: config.json sets {key}={json.dumps(value)}, not a positive integer")


def _check_regular(path: Path, where: str) -> None:
    """A FIFO or device named like a weight file would block the read forever: only regular files are read."""
    if path.exists() and not path.is_file():
        raise PretrainedError(f"{where}: {path.name} is not a regular file (a pipe, device or folder); not read")


def parameter_count(cfg: ModelConfig) -> int:
    """GPT-2's parameters for `cfg`: embeddings, positions, each block, the final norm (the head is tied)."""
    C = cfg.n_embd
    return cfg.vocab_size * C + cfg.block_size * C + cfg.n_layer * (12 * C * C + 13 * C) + 2 * C


def check_weight_room(cfg: ModelConfig, tensors: Mapping[str, Tensor], where: str) -> None:
    """Refuse sizes the weights cannot fill before a model of those sizes is built: config.json is only a claim,
    and n_layer=3000000 took 12.7 GB and 88 s before the missing tensors showed. Reading the tensors first is
    bounded by the files' own sizes."""
    held = sum(t.numel() for t in tensors.values())
    if parameter_count(cfg) > held:
        raise PretrainedError(
            f"{where}: config.json describes {parameter_count(cfg):,} parameters (n_layer={cfg.n_layer}, "
            f"n_embd={cfg.n_embd}, vocab_size={cfg.vocab_size}), more than the {held:,} its weight files hold; "
            f"the folder's config.json and weights do not belong together"
        )
