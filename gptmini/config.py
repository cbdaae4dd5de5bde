"""Typed configuration for gptmini.

Plain dataclasses, importable and usable without Hydra. `register_configs()` registers them with Hydra's
ConfigStore as schemas, so a wrong key or a wrong type in a YAML file or on the command line fails when the
config is composed, before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

POS_ENCODINGS = ("learned", "rope")
MLP_KINDS = ("gelu", "gelu_tanh", "relu2")
# `model.init_from` names: the four OpenAI GPT-2 sizes on the Hugging Face hub (gptmini.pretrained loads them).
PRETRAINED_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
NS_DTYPES = ("auto", "float32", "bfloat16")
MAX_SEED = 2**31 - 1  # numpy seeds must stay below 2**32, and the trainer adds the rank


# ----------------------------------------------------------------------------------------------------------
# Checks shared by the validators: each raises a one-line ValueError naming the key, the value and the range.


def check_int(key: str, value: object, low: int, high: int | None = None, *, none_ok: bool = False,
              note: str = "") -> None:
    """`key=value` must be an integer >= low (and <= high); None too when `none_ok`."""
    if value is None and none_ok:
        return
    if isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high):
        return
    if high is not None:
        what = f"an integer in [{low}, {high}]"
    else:
        what = {0: "a non-negative integer (>= 0)", 1: "a positive integer (>= 1)"}.get(low, f"an integer >= {low}")
    raise ValueError(f"{key}={value!r} must be {what}{' or null' if none_ok else ''}{note}")


def check_number(key: str, value: object, low: float, high: float | None = None, *, low_open: bool = False,
                 high_open: bool = False, note: str = "") -> None:
    """`key=value` must be a finite number in the interval from low to high (open ends when asked)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if ok:
        return
    if high is None:
        where = f"{'>' if low_open else '>='} {low:g}"
    else:
        where = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    raise ValueError(f"{key}={value!r} must be a finite number {where}{note}")


def check_choice(key: str, value: object, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{key}={value!r} is unknown; valid: {', '.join(valid)}")


@dataclass
class AttentionConfig:
    """Which attention implementation to use, and the knobs only some variants read."""

    name: str = "sdpa"
    # Key/value heads for grouped-query attention (`gqa`); None means one per query head.
    n_kv_head: int | None = None
    # Number of most recent tokens each query may see (`swa`); None means the whole causal context.
    window: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, complete: bool = False) -> None:
        """Refuse an unknown variant and a setting the variant would ignore (n_kv_head: only gqa reads it, window:
        only swa); with `complete` (as part of a ModelConfig) also a missing one (swa needs a window)."""
        from gptmini.attention import check_attention_config  # imported here: gptmini.attention imports us

        if self.window is not None:
            check_int("model.attention.window", self.window, 1)
        check_attention_config(self, complete)


SWA_DEFAULT_WINDOW = 64


def with_variant_defaults(attention: AttentionConfig, n_head: int) -> AttentionConfig:
    """Fill the settings a variant needs but the config left null: swa's window (64), gqa's key/value heads
    (the largest divisor of n_head up to half of it).

    The YAML groups leave them null rather than spelling the defaults out, so that `generate.py
    model/attention=swa` runs a checkpoint with its own window unless the user types model.attention.window.
    """
    if attention.name == "swa" and attention.window is None:
        return dataclasses.replace(attention, window=SWA_DEFAULT_WINDOW)
    if attention.name == "gqa" and attention.n_kv_head is None and isinstance(n_head, int) and n_head > 0:
        kv = max([d for d in range(1, n_head // 2 + 1) if n_head % d == 0], default=1)
        return dataclasses.replace(attention, n_kv_head=kv)
    return attention


def check_init_from(ref: object) -> None:
    """`model.init_from` must be one of PRETRAINED_NAMES or look like a path. Only the spelling is checked, never the
    file system: a checkpoint records the value and must stay loadable after the folder is gone."""
    is_path = isinstance(ref, str) and ref.strip() == ref and ("/" in ref or ref.startswith(("~", ".")))
    if ref in PRETRAINED_NAMES or is_path:
        return
    hint = f" (write ./{ref} for a folder here)" if isinstance(ref, str) and ref.strip() else ""
    raise ValueError(
        f"model.init_from={ref!r} is unknown; valid: {', '.join(PRETRAINED_NAMES)}, or the path of a local "
        f"Hugging Face GPT-2 folder{hint}"
    )


@dataclass
class ModelConfig:
    """GPT architecture. The defaults are a CPU-friendly small model."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 256
    vocab_size: int = 256
    # Embedding and head rows rounded up to a multiple of this (64: GPT-2's 50257 -> 50304, matmul shapes GPUs like);
    # the extra rows are never predicted: the logits stop at vocab_size.
    vocab_multiple: int = 1
    dropout: float = 0.0
    bias: bool = True
    pos_encoding: str = "learned"  # "learned" (GPT-2) or "rope"
    rope_base: float = 10000.0
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    # Modern-recipe options; the defaults keep GPT-2.
    qk_norm: bool = False  # RMS-normalise each head's queries and keys (no parameters) before the dot product
    # ... then scale both by a learnable per-dimension gain (init 1): unit-RMS q and k bound q.k/sqrt(hd) by
    # sqrt(hd), which caps how sharp attention can get; the gain lifts the cap where training wants it.
    qk_norm_gain: bool = False
    mlp: str = "gelu"  # gelu (exact) | gelu_tanh (the tanh approximation GPT-2 was trained with) | relu2: relu(x)^2
    zero_init_proj: bool = False  # attention and MLP output projections start at zero (each block starts as identity)
    logit_softcap: float | None = None  # logits = cap * tanh(logits / cap), so |logits| < cap
    # Start from pretrained GPT-2 weights: gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a local Hugging Face folder
    # (a path: it contains a "/"). The sizes then come from the weights; see gptmini.pretrained.
    init_from: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def n_kv_head(self) -> int:
        return self.attention.n_kv_head or self.n_head

    def validate(self) -> None:
        """Raise a one-line ValueError naming the first bad value."""
        if isinstance(self.attention, dict):  # built from a plain dict, e.g. a checkpoint's config
            self.attention = AttentionConfig(**self.attention)
        self.attention = with_variant_defaults(self.attention, self.n_head)
        self.attention.validate(complete=True)
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "vocab_multiple"):
            check_int(f"model.{name}", getattr(self, name), 1)
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                f"choose n_embd as a multiple of n_head"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.pos_encoding not in POS_ENCODINGS:
            raise ValueError(
                f"model.pos_encoding={self.pos_encoding!r} is unknown; valid: {', '.join(POS_ENCODINGS)}"
            )
        if self.pos_encoding == "rope" and self.head_dim % 2 != 0:
            raise ValueError(f"pos_encoding=rope needs an even head size, got n_embd/n_head={self.head_dim}")
        kv = self.attention.n_kv_head
        if kv is not None and (kv <= 0 or self.n_head % kv != 0):
            raise ValueError(
                f"model.attention.n_kv_head={kv} must be a positive divisor of model.n_head={self.n_head}"
            )
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"model.mlp={self.mlp!r} is unknown; valid: {', '.join(MLP_KINDS)}")
        if self.qk_norm_gain and not self.qk_norm:
            raise ValueError("model.qk_norm_gain=true scales normalised queries and keys; it needs model.qk_norm=true")
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise ValueError(f"model.logit_softcap={self.logit_softcap} must be a positive number or null (off)")
        if self.init_from is not None:
            from gptmini.pretrained import check_pretrained_compatible  # imported here: gptmini.pretrained imports us

            check_init_from(self.init_from)
            check_pretrained_compatible(self)


@dataclass
class TrainConfig:
    """The training loop. Iteration counts are optimizer steps (each `grad_accum` micro-batches)."""

    max_iters: int = 600
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_iters: int = 50
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 200
    eval_iters: int = 20
    attn_interval: int = 200  # attention maps to TensorBoard every this many steps (0: never)
    ckpt_interval: int = 200
    log_interval: int = 10
    resume: str = "auto"  # auto: continue from <run dir>/checkpoints/last.pt if present; never; or a path
    device: str = "auto"  # auto | cpu | cuda | mps (ROCm builds use cuda)
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    compile: bool = False
    # Rows per chunk of the fused LM head + cross-entropy (gptmini.loss): the full logits never exist, which saves
    # GPU memory (GPT-2, 16 x 1024 tokens: 3.3 GB of fp32 logits). null: the plain path.
    loss_chunk: int | None = None
    seed: int = 1337
    profile: bool = False  # trace a few steps with torch.profiler into <run dir>/profile
    strategy: str = "auto"  # under torchrun: auto (DDP when world size > 1) | ddp | fsdp (FSDP2, sharded)
    dist_timeout_s: float = 600.0  # a rank that stops answering fails the job after this long, not a hang
    sample_tokens: int = 200  # length of the text sample logged at each evaluation (0: none)
    probe_tokens: int = 48  # length of the val-split text whose attention maps are drawn
    max_bad_steps: int = 20  # consecutive non-finite steps skipped before training stops
    stop_after: int | None = None  # end this invocation after this many steps (time-boxed jobs); resume later
    final_eval: bool = True  # evaluate on the whole val split at the end
    eval_window: int | None = None  # window of the final evaluation (default: block_size)
    lr_schedule: str = "cosine"  # cosine | wsd: warm-up, stable at train.lr, linear decay over the last decay_frac
    decay_frac: float = 0.2  # wsd: fraction of max_iters spent decaying to lr * min_lr_ratio

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a one-line ValueError naming the first bad value and its valid range."""
        from gptmini.device import DEVICES, DTYPES  # imported here: they bring torch
        from gptmini.distributed import STRATEGIES
        from gptmini.optim import SCHEDULES

        for name in ("batch_size", "grad_accum", "eval_iters", "log_interval", "ckpt_interval", "max_bad_steps",
                     "probe_tokens"):
            check_int(f"train.{name}", getattr(self, name), 1)
        for name in ("max_iters", "warmup_iters", "sample_tokens"):
            check_int(f"train.{name}", getattr(self, name), 0)
        for name in ("eval_interval", "attn_interval"):
            check_int(f"train.{name}", getattr(self, name), 0, note=" (0: never)")
        check_int("train.stop_after", self.stop_after, 1, none_ok=True, note=" (no limit)")
        check_int("train.eval_window", self.eval_window, 1, none_ok=True, note=" (model.block_size)")
        check_int("train.loss_chunk", self.loss_chunk, 1, none_ok=True, note=" (the plain loss)")
        check_int("train.seed", self.seed, 0, MAX_SEED)
        check_number("train.lr", self.lr, 0, low_open=True)
        check_number("train.min_lr_ratio", self.min_lr_ratio, 0, 1)
        check_number("train.decay_frac", self.decay_frac, 0, 1)
        check_number("train.grad_clip", self.grad_clip, 0, note=" (0 disables clipping)")
        check_number("train.dist_timeout_s", self.dist_timeout_s, 0, low_open=True)
        check_choice("train.lr_schedule", self.lr_schedule, SCHEDULES)
        check_choice("train.device", self.device, DEVICES)
        check_choice("train.dtype", self.dtype, ("auto", *DTYPES))
        check_choice("train.strategy", self.strategy, STRATEGIES)
        if not isinstance(self.resume, str) or not self.resume.strip():
            raise ValueError(f"train.resume={self.resume!r} must be auto, never, or the path of a checkpoint")


@dataclass
class OptimConfig:
    """The optimizer: AdamW, or Muon with AdamW (optim.name). AdamW decays weight matrices only, never biases or norm
    gains."""

    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # The token embedding is also the (tied) output head; GPT-2 and nanoGPT decay it like any matrix.
    decay_embeddings: bool = True
    # adamw: AdamW for everything. muon: Muon (momentum, then Newton-Schulz orthogonalisation) for the 2-D weight
    # matrices inside the blocks; AdamW (at train.lr) for embeddings, head, biases and norm gains.
    name: str = "adamw"
    muon_lr: float = 0.02  # peak learning rate of the Muon matrices (follows the same schedule as train.lr)
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5  # Newton-Schulz iterations per update
    muon_weight_decay: float = 0.0  # decoupled, lr-scaled, like AdamW's
    # auto: bfloat16 where the hardware computes it natively (bf16 GPUs; CPUs with AVX512-BF16, AMX-BF16 or Arm
    # BF16), else float32 | float32 | bfloat16
    muon_ns_dtype: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a one-line ValueError naming the first bad value and its valid range."""
        from gptmini.optim import OPTIMIZERS  # imported here: gptmini.optim imports us

        check_choice("optim.name", self.name, OPTIMIZERS)
        for name in ("beta1", "beta2", "muon_momentum"):
            check_number(f"optim.{name}", getattr(self, name), 0, 1, high_open=True)
        check_number("optim.eps", self.eps, 0, low_open=True)
        for name in ("weight_decay", "muon_weight_decay", "muon_lr"):
            check_number(f"optim.{name}", getattr(self, name), 0)
        check_int("optim.muon_ns_steps", self.muon_ns_steps, 1)
        check_choice("optim.muon_ns_dtype", self.muon_ns_dtype, NS_DTYPES)


@dataclass
class DataConfig:
    """Where the corpus comes from, how it is tokenized and split. Prepared once into <data_dir>/<name>/."""

    name: str = "python_stdlib"  # folder under data_dir that holds train.bin, val.bin, meta.json
    # python_stdlib: this interpreter's standard library; files: data.path; url: data.url (data.path, when
    # set, is a local copy used instead); hub: a Hugging Face hub dataset.
    source: str = "python_stdlib"
    path: str | None = None  # a file, folder or glob of .txt/.jsonl/.json/.parquet files
    url: str | None = None
    hub_name: str | None = None  # e.g. roneneldan/TinyStories
    hub_subset: str | None = None
    hub_split: str = "train"
    text_field: str = "text"  # the column holding the text (jsonl, parquet, hub)
    streaming: bool = False  # hub: stream instead of downloading the whole dataset first
    max_tokens: int | None = None  # stop after this many tokens (streamed corpora)
    tokenizer: str = "char"  # char | bytes | tiktoken
    encoding: str = "gpt2"  # tiktoken: an encoding name or a local .tiktoken file
    val_fraction: float = 0.1
    # auto: by document when there are several (val is text the model never saw), else by position
    split: str = "auto"  # auto | document | position
    num_proc: int = 1  # processes for tokenization (Dataset.map)
    dtype: str = "auto"  # token file dtype: auto (uint16 when the vocabulary fits, else uint32) | uint16 | uint32
    on_bad_utf8: str = "error"  # error | replace (with U+FFFD, and a warning)


@dataclass
class RunConfig:
    """Everything `train.py` reads: the model, the data, the loop and the optimizer."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data_dir: str = "data"  # prepared datasets live in <data_dir>/<data.name>/

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Settings that are fine alone but not together; each message names both keys."""
        window, block = self.train.eval_window, self.model.block_size
        if window is not None and window > block:
            raise ValueError(
                f"train.eval_window={window} is larger than model.block_size={block}: the final evaluation's "
                f"windows must fit the model's context; use at most {block}, or null for block_size"
            )
        if self.optim.name == "muon" and self.train.strategy == "fsdp":
            raise ValueError(
                "optim.name=muon cannot be combined with train.strategy=fsdp: Muon orthogonalises whole matrices "
                "and FSDP shards them; use train.strategy=ddp or optim.name=adamw"
            )


@dataclass
class PrepareConfig:
    """What `python -m gptmini.data` reads."""

    data: DataConfig = field(default_factory=DataConfig)
    data_dir: str = "data"
    force: bool = False  # prepare again even when the prepared data is up to date


@dataclass
class ModelOverride:
    """Run a checkpoint with another weight-compatible attention variant (`model/attention=mha`)."""

    attention: AttentionConfig | None = None


@dataclass
class GenerateConfig:
    """Everything `generate.py` reads."""

    ckpt: str = "???"  # a run directory (its best checkpoint, else its last) or a checkpoint file
    prompt: str = "\n"
    prompt_file: str | None = None
    num_samples: int = 1
    max_new_tokens: int = 300
    temperature: float = 0.8  # 0 is greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 1337
    stop: str | None = None  # stop at this string; end-of-text always stops
    device: str = "auto"
    dtype: str = "float32"
    compile: bool = False
    kv_cache: bool = True
    out: str | None = None  # also write the samples to this file
    model: ModelOverride = field(default_factory=ModelOverride)
    attention_map: str | None = None  # write the prompt's attention weights as a PNG grid here
    attention_tb: str | None = None  # ... and/or as TensorBoard images into this directory
    attention_layers: list[int] | None = None
    attention_heads: list[int] | None = None
    attention_scale: str = "row"  # row: each row scaled to its maximum | absolute: the probabilities themselves

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_choice("attention_scale", self.attention_scale, ("row", "absolute"))
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature} must be >= 0 and finite (0 is greedy)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be a positive integer")
        if self.num_samples < 1:
            raise ValueError(f"num_samples={self.num_samples} must be >= 1")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 0")


@dataclass
class EvalOptions:
    """How `python -m gptmini.evaluate` measures a split."""

    split: str = "val"  # val | train
    window: int | None = None  # tokens per non-overlapping window (default: the model's block_size)
    batch_size: int = 64  # windows per forward pass
    device: str = "auto"
    dtype: str = "float32"


@dataclass
class EvaluateConfig:
    """Everything `python -m gptmini.evaluate` reads: a checkpoint and the data to measure it on."""

    ckpt: str = "???"  # a run directory (its best checkpoint, else its last) or a checkpoint file
    data: DataConfig | None = None  # default: the data the checkpoint was trained on
    data_dir: str | None = None  # default: the checkpoint's data_dir
    eval: EvalOptions = field(default_factory=EvalOptions)


@dataclass
class ExportConfig:
    """Everything `python -m gptmini.export` reads: a checkpoint and the Hugging Face folder to write."""

    ckpt: str = "???"  # a run directory (its best checkpoint, else its last) or a checkpoint file
    out: str = "???"  # a new (or empty) folder
    dtype: str = "float32"  # of the tensors in model.safetensors: float32 | bfloat16 | float16

    def __post_init__(self) -> None:
        check_choice("dtype", self.dtype, ("float32", "bfloat16", "float16"))


@dataclass
class HeadsOptions:
    """How `python -m gptmini.heads` probes the heads (the metrics: gptmini.head_metrics)."""

    probe_tokens: int = 128  # tokens per probe row (cut to the model's block_size)
    probe_rows: int = 4  # rows of validation text, consecutive windows from the split's start
    induction_len: int | None = None  # random tokens repeated twice for the induction score (default min(32, block/2))
    induction_batch: int = 4  # rows of repeated random tokens
    seed: int = 0  # of the random tokens: the same seed, the same probe
    device: str = "auto"

    def __post_init__(self) -> None:
        check_int("heads.probe_tokens", self.probe_tokens, 2)
        for name in ("probe_rows", "induction_batch"):
            check_int(f"heads.{name}", getattr(self, name), 1)
        check_int("heads.induction_len", self.induction_len, 1, none_ok=True, note=" (min(32, block_size / 2))")
        check_int("heads.seed", self.seed, 0, MAX_SEED)


@dataclass
class HeadsConfig:
    """Everything `python -m gptmini.heads` reads: a checkpoint, the probe text, and where the picture goes."""

    ckpt: str = "???"  # a run directory, a checkpoint file, a GPT-2 name or a Hugging Face folder
    out: str | None = "heads.png"  # the metric grids as one PNG (null: print the table only)
    prompt: str | None = None  # probe this text instead of the validation split
    data: DataConfig | None = None  # default: the data the checkpoint was trained on
    data_dir: str | None = None  # default: the checkpoint's data_dir
    heads: HeadsOptions = field(default_factory=HeadsOptions)


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent; only entry points and tests call it)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(name="generate_schema", node=GenerateConfig)
    cs.store(name="prepare_schema", node=PrepareConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(name="heads_schema", node=HeadsConfig)
