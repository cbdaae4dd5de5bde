"""The optimizer's settings: `optim.name` picks a registered optimizer (gptmini.optim.OPTIMIZER_REGISTRY, checked
by gptmini.config_checks), the AdamW settings every optimizer uses for the embeddings, head, biases and gains sit
at `optim.*`, and an optimizer's own settings sit under its own name (`optim.muon.lr`). The Hydra group
configs/optim/ selects one: `optim=adamw` (the default) or `optim=muon`."""

from __future__ import annotations

from dataclasses import dataclass, field

from gptmini.config.values import NS_DTYPES, check_choice, check_int, check_number


@dataclass
class MuonConfig:
    """Muon (momentum, then Newton-Schulz orthogonalisation) for the 2-D weight matrices inside the blocks."""

    lr: float = 0.02  # peak learning rate of the Muon matrices (follows the same schedule as train.lr)
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5  # Newton-Schulz iterations per update
    weight_decay: float = 0.0  # decoupled, lr-scaled, like AdamW's
    # auto: bfloat16 where the hardware computes it natively (bf16 GPUs; CPUs with AVX512-BF16, AMX-BF16 or Arm
    # BF16), else float32 | float32 | bfloat16
    ns_dtype: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a one-line ValueError naming the first bad value and its valid range."""
        check_number("optim.muon.momentum", self.momentum, 0, 1, high_open=True)
        for name in ("weight_decay", "lr"):
            check_number(f"optim.muon.{name}", getattr(self, name), 0)
        check_int("optim.muon.ns_steps", self.ns_steps, 1)
        check_choice("optim.muon.ns_dtype", self.ns_dtype, NS_DTYPES)


# The flat names checkpoints saved before optim.muon.* existed -> the new ones (gptmini.checkpoint upgrades them).
OLD_MUON_KEYS = {f"muon_{key}": key for key in ("lr", "momentum", "nesterov", "ns_steps", "weight_decay", "ns_dtype")}


@dataclass
class OptimConfig:
    """The optimizer (optim.name: adamw, muon, or any registered one). AdamW decays weight matrices only, never
    biases or norm gains."""

    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # The token embedding is also the (tied) output head; GPT-2 and nanoGPT decay it like any matrix.
    decay_embeddings: bool = True
    # adamw: AdamW for everything. muon: Muon for the 2-D weight matrices inside the blocks (its settings under
    # optim.muon); AdamW (at train.lr) for embeddings, head, biases and norm gains.
    name: str = "adamw"
    muon: MuonConfig = field(default_factory=MuonConfig)

    def __post_init__(self) -> None:
        if isinstance(self.muon, dict):  # from a plain dict (a checkpoint's config)
            self.muon = MuonConfig(**self.muon)
        self.validate()

    def validate(self) -> None:
        """Raise a one-line ValueError naming the first bad value and its valid range. Whether optim.name is a
        registered optimizer, the registry says (gptmini.config_checks)."""
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"optim.name={self.name!r} must name an optimizer (adamw, muon, ...)")
        for name in ("beta1", "beta2"):
            check_number(f"optim.{name}", getattr(self, name), 0, 1, high_open=True)
        check_number("optim.eps", self.eps, 0, low_open=True)
        check_number("optim.weight_decay", self.weight_decay, 0)
        self.muon.validate()
