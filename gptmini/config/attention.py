"""The attention settings: which registered variant runs, and the knobs only some variants read.

Which variant reads which knob is said by the variant's class (`Attention.reads` in gptmini.attention.core), and
checked there; here only what a value can be judged on alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gptmini.config.values import check_int

# One entry of model.attention.layers: a variant name, optionally `:` and the layer's own window (`swa:64`).
LAYER_ENTRY = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<window>[^:]*))?")
LAYERS_EXAMPLE = "[swa:64,swa:64,swa:64,sdpa]"


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
    # A per-layer pattern, repeated to model.n_layer: each entry a variant name, windowed variants optionally with
    # their own window (`[swa:64,swa:64,swa:64,sdpa]`). Set, it replaces `name` in every layer; the other settings
    # above are shared by the layers whose variant reads them. None: `name` in every layer.
    layers: list[str] | None = None

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
        if self.layers is not None:
            self.layers = list(self.layers)  # a tuple or Hydra's ListConfig: a plain list, as a checkpoint saves it
            if not self.layers:
                raise ValueError(f"model.attention.layers=[] is empty: give one variant per layer, e.g. "
                                 f"{LAYERS_EXAMPLE}, or null for model.attention.name in every layer")
            for entry in self.layers:
                parse_layer_entry(entry)

    def layer_entry(self, index: int) -> tuple[str, int | None]:
        """Layer `index`'s (0-based) variant name and its own window (None: the shared model.attention.window)."""
        if self.layers is None:
            return self.name, None
        return parse_layer_entry(self.layers[index % len(self.layers)])

    def layer_names(self, n_layer: int) -> list[str]:
        """The variant of every layer of an n_layer model."""
        return [self.layer_entry(i)[0] for i in range(n_layer)]

    def summary(self) -> str:
        """The attention as a log line shows it: the variant's name, or the pattern."""
        return self.name if self.layers is None else f"[{','.join(self.layers)}]"


def parse_layer_entry(entry: object) -> tuple[str, int | None]:
    """`name` or `name:window` -> (name, window or None); a one-line error naming model.attention.layers otherwise.
    Whether the name is a registered variant, and whether it takes a window, the registry says."""
    match = LAYER_ENTRY.fullmatch(entry) if isinstance(entry, str) else None
    if match is None:
        raise ValueError(f"model.attention.layers entry {entry!r} is not NAME or NAME:WINDOW (a variant name, "
                         f"optionally with a window), e.g. {LAYERS_EXAMPLE}")
    window = match["window"]
    if window is None:
        return match["name"], None
    if not window.isdigit() or int(window) < 1:
        raise ValueError(f"model.attention.layers entry {entry!r}: the window {window!r} must be a positive integer")
    return match["name"], int(window)
