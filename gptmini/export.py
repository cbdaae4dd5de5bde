"""Export a gptmini model as a Hugging Face GPT-2 folder: `python -m gptmini.export ckpt=RUN out=DIR`.

The folder loads with `transformers.GPT2LMHeadModel.from_pretrained(DIR)` (and the tokenizer with
`AutoTokenizer.from_pretrained(DIR)`) and computes what the gptmini model computes: the inverse of
gptmini.pretrained, so Hugging Face -> gptmini -> Hugging Face gives back the same tensors bit for bit.

Only what GPT-2's architecture can express is exported; RoPE, QK-norm, ReLU², a logit soft-cap, an output gate or
attention sinks, and variants that change the function (gqa, swa) are refused in one line. A bias-free model
(`model.bias=false`) is exported with zero biases, which computes exactly the same thing. The tokenizer files
(vocab.json, merges.txt, tokenizer_config.json) are generated from tiktoken's gpt2 encoding, byte for byte OpenAI's
originals, so nothing is downloaded; a model over any other vocabulary (char, bytes, other tiktoken encodings) is
refused, since a Hugging Face folder without its tokenizer would be unusable.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gptmini.config import ExportConfig, ModelConfig
from gptmini.gpt2_format import (
    ENDOFTEXT,
    GPT2_VOCAB,
    HF_ACTIVATIONS,
    byte_encoder,
    gpt2_ranks,
    gpt2_refusal,
    gpt2_vocab,
    is_gpt2_tokenizer,
    key_map,
)
from gptmini.model import GPT
from gptmini.paths import make_staging_dir, remove_stale_staging

EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------------------
# What can be exported


def check_exportable(cfg: ModelConfig, tokenizer_spec: Mapping[str, Any] | None) -> None:
    """Refuse, in one line naming the key, a model Hugging Face's GPT-2 cannot express. `tokenizer_spec` None
    exports the weights alone (no tokenizer files); any spec but tiktoken gpt2 is refused."""
    refusal = gpt2_refusal(cfg)  # the one list of what GPT-2 can express, shared with model.init_from
    if refusal is not None:
        raise ValueError(f"cannot export a model with {refusal[0]} as a Hugging Face GPT-2: it {refusal[1]}")
    if tokenizer_spec is None:
        return
    if not is_gpt2_tokenizer(tokenizer_spec):
        kind = tokenizer_spec.get("kind")
        used = f"tiktoken {tokenizer_spec.get('encoding')}" if kind == "tiktoken" else f"{kind}"
        raise ValueError(
            f"cannot export a model over the {used} tokenizer as a Hugging Face GPT-2: only the gpt2 vocabulary "
            f"(data.tokenizer=tiktoken data.encoding=gpt2) has GPT-2 tokenizer files"
        )
    if cfg.vocab_size < GPT2_VOCAB:
        raise ValueError(f"cannot export model.vocab_size={cfg.vocab_size}: the gpt2 tokenizer has {GPT2_VOCAB} ids")


def check_out(out: Path) -> None:
    """`out` must be a new or empty folder: an export never overwrites anything."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={out} is a file; choose a new folder")
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"out={out} exists and is not empty; choose a new folder or remove it first")


# ----------------------------------------------------------------------------------------------------------
# The files


def hf_config(cfg: ModelConfig, tokenizer_spec: Mapping[str, Any] | None, dtype: torch.dtype) -> dict[str, Any]:
    """config.json: GPT2Config's fields for this model (gptmini's one dropout in all three GPT-2 places)."""
    config: dict[str, Any] = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "activation_function": HF_ACTIVATIONS[cfg.mlp],
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, "n_inner": None,
        "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "vocab_size": cfg.vocab_size,
        "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "attn_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "resid_pdrop": cfg.dropout,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "use_cache": True, "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if tokenizer_spec is not None:
        config.update(bos_token_id=GPT2_VOCAB - 1, eos_token_id=GPT2_VOCAB - 1)
    return config


def hf_tensors(state_dict: Mapping[str, Tensor], cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Tensor]:
    """A canonical gptmini state dict -> GPT2LMHeadModel's tensors: Linear weights transposed back to Conv1D's
    (in, out), zero biases for a bias-free model, wte without padding rows, the tied head left out
    (from_pretrained ties it to wte)."""
    tensors = {}
    for hf_name, name, transposed in key_map(cfg.n_layer):
        tensor = state_dict.get(name)
        if tensor is None and name.endswith(".bias"):  # model.bias=false: a zero bias computes the same thing
            width = state_dict[name.removesuffix(".bias") + ".weight"].shape[0]
            tensor = torch.zeros(width)
        if name == "wte.weight":
            tensor = tensor[: cfg.vocab_size]  # model.vocab_multiple's padding rows are not GPT-2's
        tensor = tensor.detach().to("cpu", dtype)
        tensors[f"transformer.{hf_name}"] = (tensor.t() if transposed else tensor).contiguous()
    return tensors


def _merge_of(token: bytes, rank: int, ranks: Mapping[bytes, int]) -> tuple[bytes, bytes]:
    """The pair BPE merged into `token`: run BPE on its bytes with only the merges ranked before it; two parts
    remain (tiktoken ranks tokens in merge order, so this recovers the merge list exactly)."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        found = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))]
        best, i = min(found)
        if best >= rank:
            raise ValueError(f"the gpt2 vocabulary is not a BPE merge list: {token!r} cannot be built")
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def gpt2_merges() -> str:
    """merges.txt (OpenAI's vocab.bpe): one "left right" merge per multi-byte token, in rank order."""
    ranks, encode = gpt2_ranks(), byte_encoder()
    lines = ["#version: 0.2"]
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            left, right = _merge_of(token, rank, ranks)
            lines.append("".join(encode[b] for b in left) + " " + "".join(encode[b] for b in right))
    return "\n".join(lines) + "\n"


def write_tokenizer_files(folder: Path, block_size: int) -> None:
    """The slow-tokenizer files GPT2Tokenizer (and GPT2TokenizerFast, which converts them) loads. Decoding keeps
    spaces as they are (clean_up_tokenization_spaces false), as tiktoken does."""
    (folder / "vocab.json").write_text(json.dumps(gpt2_vocab(), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(gpt2_merges(), encoding="utf-8")
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": block_size, "bos_token": ENDOFTEXT,
              "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT, "add_prefix_space": False, "add_bos_token": False,
              "clean_up_tokenization_spaces": False, "errors": "replace"}
    _write_json(folder / "tokenizer_config.json", config)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------
# The export


def export_hf(model: GPT, tokenizer_spec: Mapping[str, Any] | None, out: str | Path,
              dtype: torch.dtype | None = None) -> None:
    """Write `model` (a gptmini GPT) as a Hugging Face GPT-2 folder `out`: config.json, model.safetensors,
    generation_config.json, and GPT-2's tokenizer files when `tokenizer_spec` is tiktoken gpt2.

    Everything is written into a hidden folder beside `out` and renamed into place at the end, so `out` is either
    complete or absent; `dtype` (default: the model's) is the tensors' dtype in the file."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    out = Path(out)
    cfg = model.config
    check_exportable(cfg, tokenizer_spec)
    check_out(out)
    dtype = dtype or next(model.parameters()).dtype
    for found, pid in remove_stale_staging(out.parent, out.name):
        print(f"export: removed {found}, left by an interrupted export (process {pid} is gone)", file=sys.stderr)
    tmp = make_staging_dir(out.parent, out.name)
    try:
        _write_json(tmp / "config.json", hf_config(cfg, tokenizer_spec, dtype))
        weights = tmp / "model.safetensors"
        save_file(hf_tensors(model.state_dict(), cfg, dtype), str(weights), metadata={"format": "pt"})
        os.chmod(weights, (tmp / "config.json").stat().st_mode & 0o777)  # safetensors writes it owner-only
        eot = {"bos_token_id": GPT2_VOCAB - 1, "eos_token_id": GPT2_VOCAB - 1} if tokenizer_spec is not None else {}
        _write_json(tmp / "generation_config.json", eot)
        if tokenizer_spec is not None:
            write_tokenizer_files(tmp, cfg.block_size)
        check_out(out)  # nothing appeared there meanwhile
        if out.is_dir():
            out.rmdir()
        tmp.rename(out)
    except (OSError, SafetensorError) as err:  # a full disk or quota: one line, and nothing left behind
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(err, "strerror", None) or " ".join(str(err).split())
        raise ValueError(f"out={str(out)!r} could not be written ({reason}); nothing was left there") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load_for_inference():
    try:
        from gptmini.checkpoint import load_for_inference
    except ImportError:  # before the move out of gptmini.generate_command
        from gptmini.generate_command import load_for_inference
    return load_for_inference


def run_export(cfg: ExportConfig) -> Path:
    """`python -m gptmini.export`: the checkpoint's model and tokenizer, exported as a Hugging Face folder."""
    out = Path(cfg.out).expanduser()
    check_out(out)  # before loading anything
    loaded = _load_for_inference()(cfg.ckpt, "cpu")
    model, tokenizer = loaded[0], loaded[1]
    export_hf(model, tokenizer.spec(), out, EXPORT_DTYPES[cfg.dtype])
    print(f"exported {cfg.ckpt} to {out} ({model.num_parameters():,} parameters, {cfg.dtype}); load it with "
          f"transformers.GPT2LMHeadModel.from_pretrained({str(out)!r})")
    return out


if __name__ == "__main__":
    from gptmini.cli import run_command

    run_command("export", run_export)
