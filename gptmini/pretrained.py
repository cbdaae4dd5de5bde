"""Pretrained GPT-2 weights from Hugging Face, in gptmini's own layout.

GPT-2 (the four OpenAI sizes, or any local folder in Hugging Face's GPT-2 layout) is exactly a gptmini GPT with
learned positions, biases, layer-norm eps 1e-5, a tied head and `model.mlp=gelu_tanh`; only the tensor names and
the orientation of the linear maps differ. Hugging Face's `Conv1D` stores its weight as (in, out), `nn.Linear` as
(out, in), so every projection is transposed, and `c_attn` (q, k, v side by side) becomes the canonical packed
`qkv` every weight-compatible attention variant loads (see gptmini.attention).

Where each entry point calls in:
    training    `model.init_from=gpt2`: `check_pretrained_tokenizer(...)` once the data's tokenizer is known, then
                `load_pretrained(cfg.model)` -> (config to build GPT with, state dict); gptmini.config_checks already
                refused what the weights cannot serve (`check_pretrained_compatible`) where the config entered.
    generation and evaluation, `ckpt=gpt2`: `is_pretrained_ref(ckpt)`, then `load_pretrained_for_inference(ckpt)`.

Only tensors are ever read: safetensors files, or `pytorch_model.bin` through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gptmini.config import PRETRAINED_NAMES, AttentionConfig, ModelConfig
from gptmini.finite import check_finite_weights
from gptmini.gpt2_format import (
    GPT2_POSITIONS,
    GPT2_VOCAB,
    expected_shapes,
    gpt2_refusal,
    gpt2_vocab,
    is_gpt2_tokenizer,
    key_map,
)
from gptmini.hf_folder import (
    WEIGHT_FILES,
    PretrainedError,
    brief,
    check_weight_room,
    hf_model_config,
    read_hf_config,
    read_hf_weights,
)
from gptmini.model import GPT
from gptmini.tokenizer import TiktokenTokenizer

HUB_REPOS = {name: f"openai-community/{name}" for name in PRETRAINED_NAMES}
# What a snapshot needs (the hub repos also hold TF, Flax, ONNX and Rust copies, gigabytes we never read).
HUB_PATTERNS = ["config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"]
BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers old transformers versions saved


# ----------------------------------------------------------------------------------------------------------
# Finding the folder


def is_pretrained_ref(ref: str) -> bool:
    """True for a GPT-2 name or a folder holding a Hugging Face `config.json` (a gptmini run directory holds
    config.yaml and checkpoints/ instead); what `ckpt=` dispatches on. A run directory called gpt2: ./gpt2."""
    return ref in PRETRAINED_NAMES or (Path(ref).expanduser() / "config.json").is_file()


def resolve_pretrained(ref: str, *, key: str = "model.init_from", cache_dir: str | Path | None = None,
                       download: bool = True) -> Path:
    """The local folder behind `ref`: a GPT-2 name (from the Hugging Face cache, downloading only when it is
    missing and the hub answers) or a local Hugging Face folder. `key` names the setting in error messages."""
    if ref in PRETRAINED_NAMES:
        return _from_hub(ref, key, cache_dir, download)
    folder = Path(ref).expanduser()
    if not folder.is_dir():
        raise PretrainedError(
            f"{key}={ref}: no such folder; give one of {', '.join(PRETRAINED_NAMES)} or a local Hugging Face "
            f"GPT-2 folder (config.json and model.safetensors or pytorch_model.bin)"
        )
    missing = [name for name in ("config.json", "weights") if not _has(folder, name)]
    if missing:
        raise PretrainedError(
            f"{key}={ref}: not a Hugging Face GPT-2 folder, it lacks "
            f"{' and '.join('model.safetensors or pytorch_model.bin' if m == 'weights' else m for m in missing)}"
        )
    return folder


def _has(folder: Path, name: str) -> bool:
    if name == "weights":
        return any((folder / f).is_file() for pair in WEIGHT_FILES for f in pair)
    return (folder / name).is_file()


def _from_hub(name: str, key: str, cache_dir: str | Path | None, download: bool) -> Path:
    """The cached snapshot of `name` (under its openai-community id, or the legacy bare id transformers used),
    else a fresh download when allowed; one line on failure."""
    from huggingface_hub import snapshot_download

    for repo in (HUB_REPOS[name], name):
        try:
            folder = Path(snapshot_download(repo, local_files_only=True, allow_patterns=HUB_PATTERNS,
                                            cache_dir=cache_dir))
        except Exception:  # not cached (or only partly): any failure here just means "look further"
            continue
        if _has(folder, "config.json") and _has(folder, "weights"):
            return folder
    reason = "downloads disabled"
    if download:
        try:
            return Path(snapshot_download(HUB_REPOS[name], allow_patterns=HUB_PATTERNS, cache_dir=cache_dir))
        except Exception as err:  # offline, no route, hub down, ...: all end in the same advice
            reason = brief(err)
    raise PretrainedError(
        f"{key}={name}: not in the local Hugging Face cache and the hub is unreachable ({reason}); download "
        f"once with network, or pass a local folder"
    )


def hf_to_canonical(tensors: Mapping[str, Tensor], cfg: ModelConfig, where: str) -> dict[str, Tensor]:
    """Hugging Face GPT-2 tensors -> a state dict `GPT(cfg).load_state_dict` takes (Conv1D transposed, the tied
    head pointing at wte, mask buffers dropped); one line for a missing, unexpected or misshapen tensor."""
    hf = {k.removeprefix("transformer."): v for k, v in tensors.items() if not k.endswith(BUFFER_SUFFIXES)}
    head = hf.pop("lm_head.weight", None)
    shapes = expected_shapes(cfg)
    sd: dict[str, Tensor] = {}
    for hf_name, name, transposed in key_map(cfg.n_layer):
        if hf_name not in hf:
            raise PretrainedError(f"{where}: the weights lack {hf_name}")
        tensor = hf.pop(hf_name)
        tensor = tensor.t().contiguous() if transposed else tensor
        if tuple(tensor.shape) != shapes[name]:
            raise PretrainedError(
                f"{where}: {hf_name} has shape {tuple(tensor.shape)}, config.json implies {shapes[name]}"
            )
        sd[name] = tensor
    if hf:
        raise PretrainedError(f"{where}: unexpected tensors for a GPT-2 ({', '.join(sorted(hf)[:3])}, ...)")
    if head is not None and not torch.equal(head, sd["wte.weight"]):
        raise PretrainedError(f"{where}: lm_head.weight differs from wte.weight, but gptmini ties them")
    sd["lm_head.weight"] = sd["wte.weight"]  # the tied head: the same tensor, as GPT.state_dict() has it
    return sd


def load_hf_gpt2(ref: str, attention: AttentionConfig | None = None, *, key: str = "model.init_from",
                 cache_dir: str | Path | None = None, download: bool = True) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The ModelConfig (all the weights' positions, dropout 0, `attention` or sdpa) and the canonical state dict
    of a GPT-2 name or local Hugging Face folder: `GPT(cfg).load_state_dict(sd)` then computes GPT-2."""
    folder = resolve_pretrained(ref, key=key, cache_dir=cache_dir, download=download)
    return _load_folder(folder, f"{key}={ref}", attention)


def _load_folder(folder: Path, where: str, attention: AttentionConfig | None) -> tuple[ModelConfig, dict[str, Tensor]]:
    cfg = hf_model_config(read_hf_config(folder, where), where, attention)
    refusal = gpt2_refusal(cfg)  # only the attention variant can be wrong here: config.json holds the rest
    if refusal is not None:
        raise PretrainedError(f"{where} cannot run with {refusal[0]}: GPT-2 {refusal[1]}")
    tensors = read_hf_weights(folder, where)
    check_weight_room(cfg, tensors, where)
    check_finite_weights(tensors, where)
    return cfg, hf_to_canonical(tensors, cfg, where)


# ----------------------------------------------------------------------------------------------------------
# What the weights can serve


def check_pretrained_compatible(requested: ModelConfig, positions: int | None = None) -> None:
    """Refuse, in one line naming the key, a model config `requested.init_from`'s weights cannot serve: what GPT-2
    cannot express (gptmini.gpt2_format), and what loading would lose. Reads no file, so it runs where the config
    enters (gptmini.config_checks); `positions` (default: 1024 for the GPT-2 names) bounds block_size."""
    ref = requested.init_from
    if ref is None:
        return
    if positions is None and ref in PRETRAINED_NAMES:
        positions = GPT2_POSITIONS
    refusal = gpt2_refusal(requested)
    if refusal is not None:
        raise ValueError(f"model.init_from={ref} cannot be combined with {refusal[0]}: GPT-2 {refusal[1]}")
    refusals = [
        (not requested.bias, "model.bias=false", "GPT-2 has a bias in every linear map and layer norm"),
        (requested.zero_init_proj, "model.zero_init_proj=true", "the pretrained weights replace the initialisation"),
        (positions is not None and requested.block_size > positions, f"model.block_size={requested.block_size}",
         f"the weights have {positions} positions; use at most {positions}"),
    ]
    for refused, setting, why in refusals:
        if refused:
            raise ValueError(f"model.init_from={ref} cannot be combined with {setting}: {why}")


def data_tokenizer_spec(tokenizer: str, encoding: str = "gpt2") -> dict[str, str]:
    """The spec a DataConfig's `tokenizer`/`encoding` will produce, so the check can run before data preparation."""
    return {"kind": tokenizer, "encoding": encoding} if tokenizer == "tiktoken" else {"kind": tokenizer}


def check_pretrained_tokenizer(ref: str, spec: Mapping[str, Any] | None, key: str = "model.init_from") -> None:
    """GPT-2 weights only mean something over GPT-2's token ids: refuse data tokenized any other way."""
    if is_gpt2_tokenizer(spec):
        return
    kind = spec.get("kind") if isinstance(spec, Mapping) else None
    used = f"tiktoken {spec.get('encoding')}" if kind == "tiktoken" else str(kind)
    raise ValueError(
        f"{key}={ref} needs data tokenized with tiktoken gpt2 (data.tokenizer=tiktoken data.encoding=gpt2); "
        f"this data uses {used}"
    )


# ----------------------------------------------------------------------------------------------------------
# For the entry points


def load_pretrained(requested: ModelConfig, *, cache_dir: str | Path | None = None,
                    download: bool = True) -> tuple[ModelConfig, dict[str, Tensor]]:
    """For training with `model.init_from`: the config to build GPT with and the state dict to load into it
    (`build_gpt(cfg, sd)` skips the random initialisation the weights replace).

    Sizes, vocabulary and MLP come from the weights; block_size (wpe cropped to it), dropout, vocab_multiple
    (wte padded with zero rows), the attention variant and document masking from `requested`, as does init_from
    (kept, so the checkpoint records where training started). The weights' vocabulary must be GPT-2's, since the data's
    tokenizer must be (`check_pretrained_tokenizer`)."""
    ref = requested.init_from
    if ref is None:
        raise ValueError("load_pretrained needs a ModelConfig with model.init_from set")
    check_pretrained_compatible(requested)
    folder = resolve_pretrained(ref, cache_dir=cache_dir, download=download)
    cfg, sd = _load_folder(folder, f"model.init_from={ref}", requested.attention)
    check_gpt2_vocabulary(folder, cfg, f"model.init_from={ref}")
    check_pretrained_compatible(requested, positions=cfg.block_size)
    cfg = dataclasses.replace(cfg, block_size=requested.block_size, dropout=requested.dropout, init_from=ref,
                              vocab_multiple=requested.vocab_multiple, doc_mask=requested.doc_mask,
                              eot_id=requested.eot_id)
    sd["wpe.weight"] = sd["wpe.weight"][: requested.block_size].contiguous()
    padding = cfg.padded_vocab - cfg.vocab_size  # model.vocab_multiple: zero rows, as GPT's own init has them
    if padding:
        wte = sd["wte.weight"]
        sd["wte.weight"] = sd["lm_head.weight"] = torch.cat([wte, wte.new_zeros(padding, wte.size(1))])
    return cfg, sd


# torch.nn.init's in-place initialisers: Linear, Embedding, MultiheadAttention and GPT.reset_parameters use them.
_INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "xavier_uniform_",
                 "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_")


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Within: torch.nn.init's initialisers leave tensors as allocated. Building GPT-2 124M only to overwrite its
    random weights spends 3-4 s of a 2-core CPU's time on two rounds of initialisation (module defaults, then
    GPT's); transformers skips it the same way. Buffers (masks) are computed as usual."""
    saved = {name: getattr(torch.nn.init, name) for name in _INITIALISERS}
    try:
        for name in saved:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def build_gpt(cfg: ModelConfig, state_dict: Mapping[str, Tensor]) -> GPT:
    """`GPT(cfg)` with `state_dict` loaded (strictly: every parameter is overwritten), without the wasted random
    initialisation; the tied head stays tied."""
    with skip_init():
        model = GPT(cfg)
    model.load_state_dict(state_dict)
    return model


class Pretrained(NamedTuple):
    """The same fields as gptmini.checkpoint.Loaded, so `ckpt=gpt2` and a run directory unpack alike."""

    model: GPT  # in eval mode
    tokenizer: TiktokenTokenizer  # gpt2
    config: dict[str, Any]  # {"model": ..., "data": {"tokenizer": "tiktoken", "encoding": "gpt2"}}, as plain data
    path: Path  # the folder the weights came from


def load_pretrained_for_inference(ref: str, device: torch.device | str = "cpu",
                                  attention: AttentionConfig | None = None, *, key: str = "ckpt",
                                  cache_dir: str | Path | None = None, download: bool = True) -> Pretrained:
    """For `generate.py ckpt=gpt2` and `python -m gptmini.evaluate ckpt=gpt2`: GPT-2 with the gpt2 tokenizer."""
    folder = resolve_pretrained(ref, key=key, cache_dir=cache_dir, download=download)
    where = f"{key}={ref}"
    cfg, sd = _load_folder(folder, where, attention)
    check_gpt2_vocabulary(folder, cfg, where)
    model = build_gpt(cfg, sd)
    config = {"model": dataclasses.asdict(cfg), "data": {"tokenizer": "tiktoken", "encoding": "gpt2"}}
    return Pretrained(model.to(device).eval(), TiktokenTokenizer("gpt2"), config, folder)


def check_gpt2_vocabulary(folder: Path, cfg: ModelConfig, where: str) -> None:
    """gptmini pairs a Hugging Face folder with tiktoken's gpt2 tokenizer: refuse a folder whose vocabulary differs
    (too few rows, or a vocab.json other than GPT-2's)."""
    if cfg.vocab_size < GPT2_VOCAB:
        raise PretrainedError(f"{where}: its {cfg.vocab_size}-token vocabulary is not GPT-2's ({GPT2_VOCAB} tokens)")
    vocab_file = folder / "vocab.json"
    if vocab_file.is_file():
        try:
            same = json.loads(vocab_file.read_text(encoding="utf-8")) == gpt2_vocab()
        except (OSError, ValueError):
            same = False
        if not same:
            raise PretrainedError(f"{where}: its vocab.json is not GPT-2's; gptmini only has the gpt2 tokenizer")
