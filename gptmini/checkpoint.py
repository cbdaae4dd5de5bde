"""Checkpoints: the one module that knows their format, how a run directory holds them, and how to read them.

A checkpoint is one self-contained file, written atomically, holding only tensors, numbers, strings, lists and
dicts, so `torch.load(weights_only=True)` can read it: nothing in it is executed or imported. The config is a
plain dict, never a pickled object. Keys: `format`, `version`, `model`, `optimizer`, `scaler`, `sampler`, `rng`
(one entry per rank), `step`, `best_val_loss`, `skipped_steps`, `config` (the whole run config as a dict) and
`tokenizer` (its spec). A run directory keeps `checkpoints/last.pt` (where training resumes) and
`checkpoints/best.pt` (lowest validation loss, what generation and evaluation prefer).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from gptmini.attention import attention_class, layer_attention, weight_compatible_variants
from gptmini.attention.core import OPTIONAL_KEYS
from gptmini.config import OLD_MUON_KEYS, AttentionConfig, ModelConfig, OptimConfig
from gptmini.finite import check_finite_weights
from gptmini.model import GPT
from gptmini.paths import CHECKPOINTS_DIR, check_name_lengths
from gptmini.pretrained import is_pretrained_ref, load_pretrained_for_inference
from gptmini.tokenizer import Tokenizer, tokenizer_from_spec

CHECKPOINT_FORMAT = "gptmini-checkpoint"
CHECKPOINT_VERSION = 1


LAST, BEST = "last.pt", "best.pt"


class CheckpointError(ValueError):
    """A file that is missing, unreadable, or not a gptmini checkpoint, or one that cannot serve the request."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write `state` to `path` so that a crash at any moment leaves either the old file or the new one.

    Temporary file in the same directory, fsync, atomic rename, fsync of the directory.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"cannot create {str(path.parent)!r} for checkpoints: {err.strerror}") from None
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise CheckpointError(f"cannot write a checkpoint into {str(path.parent)!r}: {err.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    # Disk full, quota, read-only: the previous checkpoint stays as it was. torch.save reports a failed write
    # inside its zip writer as a RuntimeError ("PytorchStreamWriter failed writing file ..."), not an OSError.
    except (OSError, RuntimeError) as err:
        Path(tmp).unlink(missing_ok=True)
        reason = getattr(err, "strerror", None) or str(err).strip().splitlines()[0]
        raise CheckpointError(
            f"could not save {str(path)!r} ({reason}); the previous checkpoint there is intact"
        ) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True`; a clear CheckpointError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    # The weights-only unpickler fails on arbitrary bytes in many ways (KeyError from its memo on a text file,
    # IndexError, UnicodeDecodeError, ...): any failure to read means "not a readable checkpoint".
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError, OSError, KeyError,
            IndexError, TypeError, AttributeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if not isinstance(err, (pickle.UnpicklingError, RuntimeError, ValueError, OSError)):
            first_line = f"{type(err).__name__} {first_line}".strip()  # e.g. "KeyError 544502645"
        raise CheckpointError(
            f"{str(path)!r} is not a readable gptmini checkpoint (truncated, corrupted, or holding objects that "
            f"weights_only loading refuses): {first_line}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a gptmini checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} has checkpoint version {state.get('version')}, expected {CHECKPOINT_VERSION}"
        )
    return state


def find_checkpoint(path: str | Path) -> Path:
    """A run directory means its best checkpoint, else its last; a file means itself."""
    path = Path(path)
    if path.is_dir():
        for candidate in (checkpoint_dir(path) / BEST, checkpoint_dir(path) / LAST):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"run directory {str(path)!r} has no checkpoints/best.pt or checkpoints/last.pt")
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    return path


def resume_path(resume: str, ckpt_dir: Path) -> Path | None:
    """Which checkpoint `train.resume` continues from. Never lets a fresh run overwrite another run's checkpoints."""
    last = ckpt_dir / LAST
    existing = [p for p in (last, ckpt_dir / BEST) if p.is_file()]
    if resume == "auto":
        if not last.is_file() and existing:
            raise CheckpointError(
                f"{ckpt_dir} holds {existing[0].name} but no {LAST}; resume from it with "
                f"train.resume={existing[0]}, or start afresh in a new hydra.run.dir"
            )
        return last if last.is_file() else None
    path = None if resume == "never" else Path(resume)
    if path is not None and not path.is_file():
        raise CheckpointError(f"train.resume={resume!r}: no such checkpoint file (valid: auto, never, or a path)")
    if existing and (path is None or path.resolve().parent != ckpt_dir.resolve()):
        raise CheckpointError(
            f"train.resume={resume}: the run directory already holds another run's checkpoints ({ckpt_dir}), "
            f"which this run would overwrite; continue it with train.resume=auto, or choose a new hydra.run.dir"
        )
    return path


# Optimizer settings that shape its state (which optimizer, which parameter groups): fixed for a run's life.
OPTIMIZER_LAYOUT = ("name", "decay_embeddings")


def upgrade_saved_config(config: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's saved config in today's layout: checkpoints saved before optim.muon.* existed hold Muon's
    settings as flat optim.muon_* keys; they move under optim.muon, so such a checkpoint resumes as it always did
    (and the resume notes compare like with like). A copy; `config` is unchanged."""
    optim = dict(config.get("optim") or {})
    old = {new: optim.pop(key) for key, new in OLD_MUON_KEYS.items() if key in optim}
    if not old:
        return config
    optim["muon"] = {**old, **(optim.get("muon") or {})}
    return {**config, "optim": optim}


def with_later_fields(model: dict[str, Any]) -> dict[str, Any]:
    """A saved model config with the fields added to ModelConfig/AttentionConfig after it was written filled in with
    their defaults (each new field defaults to what the code did before it existed), so that an older checkpoint
    resumes instead of differing in settings it never had. A copy."""
    filled = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name not in model
              and f.default is not dataclasses.MISSING}
    attention = model.get("attention")
    if isinstance(attention, dict):
        defaults = {f.name: f.default for f in dataclasses.fields(AttentionConfig)}
        filled["attention"] = {**{k: v for k, v in defaults.items() if k not in attention}, **attention}
    return {**model, **filled}


def check_compatible(saved: dict[str, Any], model_cfg: ModelConfig, tokenizer_spec: dict[str, Any],
                     optim_cfg: OptimConfig | None = None) -> None:
    """Refuse to resume a checkpoint whose model, tokenizer or optimizer layout differs, naming the fields."""
    ours = dataclasses.asdict(model_cfg)
    theirs = with_later_fields(saved["config"]["model"])
    diffs = [
        f"model.{k}: checkpoint {theirs.get(k)!r} vs now {ours[k]!r}" for k in ours if theirs.get(k) != ours[k]
    ]
    if optim_cfg is not None:
        saved_optim = upgrade_saved_config(saved["config"]).get("optim", {})
        diffs += [f"optim.{k}: checkpoint {saved_optim[k]!r} vs now {getattr(optim_cfg, k)!r}"
                  for k in OPTIMIZER_LAYOUT if k in saved_optim and saved_optim[k] != getattr(optim_cfg, k)]
    if saved.get("tokenizer") != tokenizer_spec:
        diffs.append(TOKENIZER_DIFFERS)
    if diffs:
        raise _cannot_resume(diffs)


TOKENIZER_DIFFERS = "tokenizer: the checkpoint was trained with a different tokenizer/vocabulary"


def check_tokenizer(saved: dict[str, Any], tokenizer_spec: dict[str, Any]) -> None:
    """The tokenizer half of `check_compatible`, asked of the data before it is swapped in (see `prepare`)."""
    if saved.get("tokenizer") != tokenizer_spec:
        raise _cannot_resume([TOKENIZER_DIFFERS])


def _cannot_resume(diffs: list[str]) -> CheckpointError:
    return CheckpointError(
        "cannot resume: the checkpoint's configuration differs (" + "; ".join(diffs) + "); use the same "
        "settings, train.resume=never, or a new hydra.run.dir"
    )


# ----------------------------------------------------------------------------------------------------------
# Random-number state: part of a checkpoint so that a resumed run continues exactly.


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------------
# Inference: a model, its tokenizer and its saved config, from one read of the file.


class Loaded(NamedTuple):
    model: GPT
    tokenizer: Tokenizer
    config: dict[str, Any]  # the run config the checkpoint was trained with, as plain data
    path: Path


def load_for_inference(
    ckpt: str | Path, device: torch.device | str = "cpu", attention: AttentionConfig | None = None
) -> Loaded:
    """Rebuild model and tokenizer from a checkpoint (run directory or file), optionally with another attention.

    Only weight-compatible variants can stand in for one another (see gptmini.attention); anything else is
    refused with a one-line error, as is a checkpoint whose tensors do not fit its own config. A GPT-2 name or a
    Hugging Face folder (`ckpt=gpt2`) loads the pretrained weights instead (gptmini.pretrained).
    """
    check_name_lengths(ckpt, "ckpt")
    if is_pretrained_ref(str(ckpt)):
        gpt2_attention = AttentionConfig("mha")  # GPT-2's own: the textbook multi-head attention
        wanted = gpt2_attention if attention is None else swap_attention(gpt2_attention, attention)
        return Loaded(*load_pretrained_for_inference(str(ckpt), device, wanted))
    path = find_checkpoint(ckpt)
    state = load_checkpoint(path)
    try:
        config = state["config"]
        model_cfg = ModelConfig(**config["model"])
        tokenizer = tokenizer_from_spec(state["tokenizer"])
        weights = state["model"]
        if not isinstance(weights, dict):
            raise TypeError(f"'model' holds a {type(weights).__name__}, not a state dict")
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{str(path)!r} lacks a valid model config, tokenizer or weights ({err})") from None
    check_finite_weights(weights, repr(str(path)))
    if attention is not None:
        swapped = swap_attention(model_cfg.attention, attention, model_cfg)
        model_cfg = dataclasses.replace(model_cfg, attention=swapped)
    model = GPT(model_cfg)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).strip().splitlines()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise CheckpointError(f"{str(path)!r}: its tensors do not fit its config ({detail})") from None
    return Loaded(model.to(device).eval(), tokenizer, config, path)


# How a setting that the weights fix is named in the message refusing another value.
_FIXED_BY_WEIGHTS = {
    "n_kv_head": "key/value heads are",
    "gate": "an output gate is",
    "sinks": "attention sinks are",
}


def _shown(value: object) -> str:
    """A setting as the user types it (booleans as true/false)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def swap_attention(trained: AttentionConfig, wanted: AttentionConfig,
                   model: ModelConfig | None = None) -> AttentionConfig:
    """The attention config to run with: `wanted` when it can load weights trained with `trained`.

    Settings `wanted` leaves null or false (the YAML groups do) keep the checkpoint's own values: a model trained with
    window 4 and run as `model/attention=swa` still sees 4 tokens, unless the user typed model.attention.window.
    With a pattern (model.attention.layers) on either side, each of the model's n_layer layers is swapped alone (every
    layer's two variants the same, or both weight-compatible) and the result is the pattern of every layer.
    Switches the weights fix (gate, sinks) always follow the checkpoint (see `_keep_switches`).
    """
    if trained.layers is None and wanted.layers is None:
        return _swap_variant(trained, wanted)
    n_layer = model.n_layer if model is not None else len(wanted.layers or trained.layers or ())
    where = f" (layer {{}} of model.attention.layers={trained.summary()})" if trained.layers else " (layer {})"
    own = [_swap_variant(layer_attention(trained, i, model), layer_attention(wanted, i), where.format(i))
           for i in range(n_layer)]
    shared = {}
    for key in OPTIONAL_KEYS:  # one shared value per setting (the layers that read it agree: they were trained so)
        values = {getattr(layer, key) for layer in own if key in attention_class(layer.name).reads}
        shared[key] = values.pop() if len(values) == 1 and key != "window" else getattr(AttentionConfig(), key)
    entries = [layer.name if layer.window is None else f"{layer.name}:{layer.window}" for layer in own]
    return dataclasses.replace(wanted, layers=entries, **shared)


def _swap_variant(trained: AttentionConfig, wanted: AttentionConfig, where: str = "") -> AttentionConfig:
    """swap_attention for one variant on each side (`where`: which layer of a pattern, for the message)."""
    compatible = weight_compatible_variants()
    if wanted.name != trained.name and (wanted.name not in compatible or trained.name not in compatible):
        raise CheckpointError(
            f"model/attention={wanted.name} cannot run weights trained with {trained.name!r}{where}: only these "
            f"variants are interchangeable: {', '.join(compatible)}"
        )
    wanted = _keep_switches(trained, wanted, where)
    if wanted.name == trained.name:
        cls = attention_class(wanted.name)
        # null (a size) or false (a switch: gate, sinks) is what the YAML groups leave: the checkpoint's own value
        unset = [key for key in cls.reads if getattr(wanted, key) is None or getattr(wanted, key) is False]
        kept = {key: getattr(trained, key) for key in unset}
        wanted = dataclasses.replace(wanted, **kept)
        for key in cls.fixed_by_weights:
            if getattr(wanted, key) != getattr(trained, key):
                raise CheckpointError(
                    f"model.attention.{key}={_shown(getattr(wanted, key))} does not match the checkpoint's "
                    f"{key}={_shown(getattr(trained, key))}{where}; {_FIXED_BY_WEIGHTS.get(key, key)} fixed by the "
                    f"weights"
                )
    return wanted


def _keep_switches(trained: AttentionConfig, wanted: AttentionConfig, where: str = "") -> AttentionConfig:
    """`wanted` with the checkpoint's on/off settings that its weights fix (model.attention.gate, sinks).

    The YAML groups spell them `false`, which cannot be told from a typed false, so a checkpoint with them on
    keeps them on (its weights need them) in any variant that reads them; one trained without them refuses a
    typed `true` (there are no weights to run it with)."""
    cls = attention_class(wanted.name)
    for key in attention_class(trained.name).fixed_by_weights:
        if not isinstance(getattr(trained, key), bool):
            continue
        if getattr(trained, key) and key not in cls.reads:
            readers = [name for name in weight_compatible_variants() if key in attention_class(name).reads]
            raise CheckpointError(
                f"model/attention={wanted.name} cannot run weights trained with model.attention.{key}=true{where}: "
                f"{wanted.name} does not read it; use one that does ({', '.join(readers) or 'none'})"
            )
        if getattr(wanted, key) and not getattr(trained, key):
            raise CheckpointError(
                f"model.attention.{key}=true does not match the checkpoint's {key}=false{where}; "
                f"{_FIXED_BY_WEIGHTS.get(key, key)} fixed by the weights"
            )
        if key in cls.reads:
            wanted = dataclasses.replace(wanted, **{key: getattr(trained, key)})
    return wanted
