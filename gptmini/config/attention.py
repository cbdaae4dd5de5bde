"""The attention settings: which registered variant runs, and the knobs only some variants read.

Which variant reads which knob is said by the variant's class (`Attention.reads` in gptmini.attention.core), and
checked there; here only what a value can be judged on alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptmini.config.values import check_int


@dataclass
class AttentionConfig:
    """Which attention implementation to use, and the knobs only some variants read."""

    name: str = "sdpa"
    # Key/value heads for grouped-query attention (`gqa`); None means one per query head.
    n_kv_head: int | None = None
    # Number of most recent tokens each query may see (`swa`); None means the whole causal context.
    window: int | None = None
    # Multi-head latent attention (`mla`): the per-token key/value latent's width, the query latent's width (None:
    # queries straight from the input) and the width of the decoupled rotary part (pos_encoding=rope only).
    kv_rank: int | None = None
    q_rank: int | None = None
    rope_dim: int | None = None
    # A head-specific sigmoid gate on the attention output, before the output projection (Qiu et al., 2025, G1).
    gate: bool = False
    # A learned logit per head in every softmax denominator that takes probability mass without a value (gpt-oss).
    sinks: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse sizes that are not positive integers and switches that are not booleans. Which variants exist and
        which settings each reads, the attention registry says (gptmini.attention.check_attention_config, run by
        gptmini.config_checks)."""
        for key in ("window", "kv_rank", "q_rank", "rope_dim"):
            check_int(f"model.attention.{key}", getattr(self, key), 1, none_ok=True)
        if self.rope_dim is not None and self.rope_dim % 2 != 0:
            raise ValueError(f"model.attention.rope_dim={self.rope_dim} must be even: RoPE rotates pairs of dimensions")
        for key in ("gate", "sinks"):
            value = getattr(self, key)
            if not isinstance(value, bool):
                raise ValueError(f"model.attention.{key}={value!r} must be true or false")
