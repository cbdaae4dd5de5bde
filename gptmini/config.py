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


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent; only entry points and tests call it)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(group="model", name="schema", node=ModelConfig)
    cs.store(group="model/attention", name="schema", node=AttentionConfig)
