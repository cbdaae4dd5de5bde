"""Typed configuration for gptmini: the bottom layer, importing nothing of gptmini outside this package.

Plain dataclasses, importable and usable without Hydra. `register_configs()` registers them with Hydra's
ConfigStore as schemas, so a wrong key or a wrong type in a YAML file or on the command line fails when the
config is composed, before any work starts. Each dataclass checks what it can judge alone when it is built;
what needs a registry (attention variants, pretrained weights) is checked above, in gptmini.config_checks.
`values` holds the lists of valid values and the one-line checks against them; `tools` the settings of the
commands that read runs without training them (export, compare).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from gptmini.config.attention import AttentionConfig  # noqa: F401  (gptmini.config's names too)
from gptmini.config.data import DataConfig  # noqa: F401  (gptmini.config's names too)
from gptmini.config.optim import OLD_MUON_KEYS, MuonConfig, OptimConfig  # noqa: F401  (public names of gptmini.config)
from gptmini.config.tools import CompareConfig, ExportConfig, HeadsConfig, HeadsOptions  # noqa: F401
from gptmini.config.values import (  # noqa: F401  (the lists and checks are gptmini.config's public names too)
    DEVICES,
    DTYPE_NAMES,
    MAX_SEED,
    MLP_KINDS,
    NS_DTYPES,
    POS_ENCODINGS,
    PRETRAINED_NAMES,
    SCHEDULES,
    STRATEGIES,
    check_choice,
    check_init_from,
    check_int,
    check_number,
)

# Variant name -> its class's `with_defaults`, filled by gptmini.attention.register_attention: the class says its
# defaults, this package (below the registry) only looks them up. An unknown name (refused later) keeps its settings.
VARIANT_DEFAULTS: dict[str, Callable[[AttentionConfig, ModelConfig], AttentionConfig]] = {}


def with_variant_defaults(model: ModelConfig) -> AttentionConfig:
    """`model.attention` with the settings its variant needs but the config left null filled in from the other sizes
    (swa's window, gqa's key/value heads, mla's latent widths). The YAML groups leave them null so that
    `generate.py model/attention=swa` runs a checkpoint with its own window. Sizes that are not positive integers
    are left to `validate` to refuse."""
    fill = VARIANT_DEFAULTS.get(model.attention.name)
    if model.attention.layers is not None:
        return model.attention  # a pattern: each layer's variant fills its own (gptmini.attention.layer_attention)
    sizes = (model.n_head, model.n_embd)
    if fill is None or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes):
        return model.attention
    return fill(model.attention, model)


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
    # Document masking: in training and evaluation a token attends only to earlier tokens of its own document. A
    # document starts at each end-of-text id the data writes between documents (eot_id: train.py fills it from the
    # data's tokenizer; null without doc_mask). doc_rope_reset (pos_encoding=rope): positions restart at each one.
    doc_mask: bool = False
    doc_rope_reset: bool = False
    eot_id: int | None = None
    # Start from pretrained GPT-2 weights: gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a local Hugging Face folder
    # (a path: it contains a "/"). The sizes then come from the weights; see gptmini.pretrained.
    init_from: str | None = None

    def __post_init__(self) -> None:
        """Normalise (a checkpoint's dict becomes an AttentionConfig, variant defaults are filled in), then validate."""
        if isinstance(self.attention, dict):
            self.attention = AttentionConfig(**self.attention)
        self.attention = with_variant_defaults(self)
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

    def check_attention_sizes(self) -> None:
        """The model.attention sizes that are judged against the model's own (whichever variant reads them)."""
        kv = self.attention.n_kv_head
        if kv is not None and (kv <= 0 or self.n_head % kv != 0):
            raise ValueError(f"model.attention.n_kv_head={kv} must be a positive divisor of model.n_head={self.n_head}")
        for key in ("kv_rank", "q_rank"):
            rank = getattr(self.attention, key)
            if rank is not None and rank > self.n_embd:
                raise ValueError(f"model.attention.{key}={rank} is wider than model.n_embd={self.n_embd}: a latent "
                                 f"compresses the input; choose at most {self.n_embd}")
        rope_dim = self.attention.rope_dim
        if rope_dim is not None and self.pos_encoding != "rope":
            raise ValueError(f"model.attention.rope_dim={rope_dim} sizes a rotary part, which needs "
                             f"model.pos_encoding=rope (got {self.pos_encoding}); remove the setting")

    def validate(self) -> None:
        """Raise a one-line ValueError naming the first bad value. What needs a registry (the attention variant and
        the settings it reads, what model.init_from's weights can serve) is checked by gptmini.config_checks."""
        self.attention.validate()
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "vocab_multiple"):
            check_int(f"model.{name}", getattr(self, name), 1)
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                             f"choose n_embd as a multiple of n_head")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")
        check_choice("model.pos_encoding", self.pos_encoding, POS_ENCODINGS)
        if self.pos_encoding == "rope" and self.head_dim % 2 != 0:
            raise ValueError(f"pos_encoding=rope needs an even head size, got n_embd/n_head={self.head_dim}")
        self.check_attention_sizes()
        layers = self.attention.layers
        if layers is not None and len(layers) > self.n_layer:
            raise ValueError(f"model.attention.layers has {len(layers)} entries, more than model.n_layer="
                             f"{self.n_layer}: give at most one per layer (the list repeats to fill the rest)")
        check_choice("model.mlp", self.mlp, MLP_KINDS)
        if self.qk_norm_gain and not self.qk_norm:
            raise ValueError("model.qk_norm_gain=true scales normalised queries and keys; it needs model.qk_norm=true")
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise ValueError(f"model.logit_softcap={self.logit_softcap} must be a positive number or null (off)")
        if self.init_from is not None:
            check_init_from(self.init_from)
        self.check_documents()

    def check_documents(self) -> None:
        """model.doc_mask and what only it gives meaning to: the end-of-text id, positions restarted per document."""
        for key in ("doc_mask", "doc_rope_reset"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"model.{key}={getattr(self, key)!r} must be true or false")
        check_int("model.eot_id", self.eot_id, 0, self.vocab_size - 1, none_ok=True, note=" (set from the data)")
        if self.eot_id is not None and not self.doc_mask:
            raise ValueError(f"model.eot_id={self.eot_id} is read only with model.doc_mask=true; remove it")
        if self.doc_rope_reset and not (self.doc_mask and self.pos_encoding == "rope"):
            raise ValueError(
                "model.doc_rope_reset=true restarts rotary positions at each document: it needs model.doc_mask=true "
                f"and model.pos_encoding=rope (got doc_mask={str(self.doc_mask).lower()}, "
                f"pos_encoding={self.pos_encoding})"
            )


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
    # The schedule's length (null: train.max_iters). A resumed run given a larger max_iters re-stretches the
    # schedule over it; schedule_iters=<the old max_iters> continues the old, decayed schedule instead.
    schedule_iters: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a one-line ValueError naming the first bad value and its valid range."""
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
        check_int("train.schedule_iters", self.schedule_iters, 1, none_ok=True)
        check_number("train.grad_clip", self.grad_clip, 0, note=" (0 disables clipping)")
        check_number("train.dist_timeout_s", self.dist_timeout_s, 0, low_open=True)
        check_choice("train.lr_schedule", self.lr_schedule, SCHEDULES)
        check_choice("train.device", self.device, DEVICES)
        check_choice("train.dtype", self.dtype, ("auto", *DTYPE_NAMES))
        check_choice("train.strategy", self.strategy, STRATEGIES)
        if not isinstance(self.resume, str) or not self.resume.strip():
            raise ValueError(f"train.resume={self.resume!r} must be auto, never, or the path of a checkpoint")




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
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto (train.dtype's rule for the checkpoint's model)
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
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto (train.dtype's rule for the checkpoint's model)


@dataclass
class EvaluateConfig:
    """Everything `python -m gptmini.evaluate` reads: a checkpoint and the data to measure it on."""

    ckpt: str = "???"  # a run directory (its best checkpoint, else its last) or a checkpoint file
    data: DataConfig | None = None  # default: the data the checkpoint was trained on
    data_dir: str | None = None  # default: the checkpoint's data_dir
    eval: EvalOptions = field(default_factory=EvalOptions)


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent; only entry points and tests call it)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(name="generate_schema", node=GenerateConfig)
    cs.store(name="prepare_schema", node=PrepareConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(name="compare_schema", node=CompareConfig)
    cs.store(name="heads_schema", node=HeadsConfig)
