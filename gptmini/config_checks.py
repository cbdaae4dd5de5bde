"""The config checks that need a registry, in one place above the registries.

gptmini.config sits at the bottom and judges every value it can alone when a config is built. Whether an
attention variant exists and which settings it reads is the attention registry's to say (whether an optimizer
exists and can run under train.strategy, the optimizer registry's), and what
`model.init_from`'s weights can serve is gptmini.pretrained's; both are asked here. Every command calls
`check_config` where its config enters (gptmini.cli.to_dataclass, before Hydra creates the run directory), and
`build_run` calls `check_run_config` again for callers of `gptmini.trainer.train`, so a wrong value fails in one
line before anything is written.
"""

from __future__ import annotations

from gptmini.attention import check_attention_config, check_layer
from gptmini.config import GenerateConfig, ModelConfig, RunConfig
from gptmini.optim import check_optimizer_config
from gptmini.pretrained import check_pretrained_compatible


def check_model_config(model: ModelConfig) -> None:
    """The attention variant, its settings (complete: about to build a model), the sizes it can take and whether it
    can mask by document (model.doc_mask), then the pretrained weights."""
    for index in range(model.n_layer):
        check_layer(model, index)
    check_pretrained_compatible(model)


def check_run_config(run: RunConfig) -> None:
    """What `train.py` reads, beyond what RunConfig checked itself."""
    check_model_config(run.model)
    check_optimizer_config(run)


def check_generate_config(generate: GenerateConfig) -> None:
    """A `model/attention=...` override names a registered variant and sets only what it reads (what the
    checkpoint's weights allow is checked when they are loaded)."""
    if generate.model.attention is not None:
        check_attention_config(generate.model.attention, complete=False)


def check_config(cfg: object) -> None:
    """Whichever command config `cfg` is, the checks above that apply to it; the others need none."""
    if isinstance(cfg, RunConfig):
        check_run_config(cfg)
    elif isinstance(cfg, GenerateConfig):
        check_generate_config(cfg)
