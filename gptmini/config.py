"""Typed configuration for gptmini.

Plain dataclasses, importable and usable without Hydra. `register_configs()` registers them with Hydra's
ConfigStore as schemas, so a wrong key or a wrong type in a YAML file or on the command line fails when the
config is composed, before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

POS_ENCODINGS = ("learned", "rope")


@dataclass
class AttentionConfig:
    """Which attention implementation to use, and the knobs only some variants read."""

    name: str = "sdpa"
    # Key/value heads for grouped-query attention (`gqa`); None means one per query head.
    n_kv_head: int | None = None
    # Number of most recent tokens each query may see (`swa`); None means the whole causal context.
    window: int | None = None


@dataclass
class ModelConfig:
    """GPT architecture. The defaults are a CPU-friendly small model."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 256
    vocab_size: int = 256
    dropout: float = 0.0
    bias: bool = True
    pos_encoding: str = "learned"  # "learned" (GPT-2) or "rope"
    rope_base: float = 10000.0
    attention: AttentionConfig = field(default_factory=AttentionConfig)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_kv_head(self) -> int:
        return self.attention.n_kv_head or self.n_head

    def validate(self) -> None:
        """Raise a one-line ValueError naming the first bad value."""
        if isinstance(self.attention, dict):  # built from a plain dict, e.g. a checkpoint's config
            self.attention = AttentionConfig(**self.attention)
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model.{name}={value!r} must be a positive integer")
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
        window = self.attention.window
        if window is not None and window <= 0:
            raise ValueError(f"model.attention.window={window} must be a positive integer")


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
    seed: int = 1337
    profile: bool = False  # trace a few steps with torch.profiler into <run dir>/profile
    sample_tokens: int = 200  # length of the text sample logged at each evaluation (0: none)
    probe_tokens: int = 48  # length of the val-split text whose attention maps are drawn
    max_bad_steps: int = 20  # consecutive non-finite steps skipped before training stops
    final_eval: bool = True  # evaluate on the whole val split at the end
    eval_window: int | None = None  # window of the final evaluation (default: block_size)


@dataclass
class OptimConfig:
    """AdamW. Weight decay applies to weight matrices only, never to biases or norm gains."""

    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # The token embedding is also the (tied) output head; GPT-2 and nanoGPT decay it like any matrix.
    decay_embeddings: bool = True


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent; only entry points and tests call it)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(group="model", name="schema", node=ModelConfig)
    cs.store(group="model/attention", name="schema", node=AttentionConfig)
