"""Where a config meets the attention registry: the one-line checks of model.attention (a variant that exists,
settings it reads, a pattern's entries, document masking) and the module each layer is built with."""

from __future__ import annotations

import dataclasses

from gptmini.attention.core import ATTENTION_REGISTRY, OPTIONAL_KEYS, Attention, attention_class
from gptmini.config import AttentionConfig, ModelConfig


def check_attention_config(attention: AttentionConfig, complete: bool = True) -> None:
    """Refuse, in one line, a variant that does not exist and settings the chosen variant would ignore, and (when
    `complete`: the config is about to build a model) settings it needs but lacks. A pattern
    (model.attention.layers) is checked entry by entry, and each setting must be read by one of its variants."""
    if attention.layers is not None:
        return check_layer_pattern(attention, complete)
    cls = attention_class(attention.name)
    for key in OPTIONAL_KEYS:
        value = getattr(attention, key)
        if value is not None and value is not False and key not in cls.reads:
            readers = sorted(name for name, other in ATTENTION_REGISTRY.items() if key in other.reads)
            users = f"; only {', '.join(readers)} {'reads' if len(readers) == 1 else 'read'} it" if readers else ""
            choose = f" or choose model/attention={readers[0]}" if readers else ""
            shown = str(value).lower() if isinstance(value, bool) else value
            because = f" ({cls.not_read_because[key]})" if key in cls.not_read_because else ""
            raise ValueError(
                f"model.attention.{key}={shown} is ignored by attention variant {attention.name!r}{because}{users}: "
                f"remove the setting{choose}"
            )
        if value is None and key in cls.needs and complete:
            raise ValueError(
                f"attention variant {attention.name!r} needs model.attention.{key} (a positive integer)"
            )


def check_doc_mask(config: ModelConfig) -> None:
    """Refuse, in one line, model.doc_mask=true with a variant that does not honour `docs` (its `doc_mask` flag):
    it would attend across documents while the config says it does not."""
    if not config.doc_mask or attention_class(config.attention.name).doc_mask:
        return
    able = sorted(name for name, cls in ATTENTION_REGISTRY.items() if cls.doc_mask)
    raise ValueError(
        f"model.doc_mask=true is not supported by attention variant {config.attention.name!r} (it cannot keep "
        f"attention inside each document); use model.doc_mask=false or one of: {', '.join(able)}"
    )


def check_layer_pattern(attention: AttentionConfig, complete: bool) -> None:
    """model.attention.layers: every entry a registered variant, a window only where the variant reads one, and
    every shared setting read by some layer's variant (the layers that do not read it leave it alone)."""
    shown, classes = f"model.attention.layers={attention.summary()}", []
    for index, entry in enumerate(attention.layers or ()):
        name, window = attention.layer_entry(index)
        if name not in ATTENTION_REGISTRY:
            raise ValueError(f"{shown}: {name!r} is not an attention variant; valid: {', '.join(ATTENTION_REGISTRY)}")
        classes.append(cls := ATTENTION_REGISTRY[name])
        if window is not None and "window" not in cls.reads:
            takers = ", ".join(n for n, other in ATTENTION_REGISTRY.items() if "window" in other.reads)
            raise ValueError(f"{shown}: {entry!r} gives a window to {name!r}, which takes none (only {takers} do)")
    for key in OPTIONAL_KEYS:
        value = getattr(attention, key)
        if value is not None and value is not False and not any(key in cls.reads for cls in classes):
            raise ValueError(f"model.attention.{key}={str(value).lower() if isinstance(value, bool) else value} is "
                             f"ignored by every variant of {shown}: remove the setting")
    for index in range(len(classes)):  # what each variant needs, its defaults (n_head) fill: build_attention checks
        check_attention_config(layer_attention(attention, index), complete=False)


def layer_attention(attention: AttentionConfig, layer_index: int, model: ModelConfig | None = None) -> AttentionConfig:
    """Layer `layer_index`'s own settings (`attention` itself without a pattern): its entry's variant and window, the
    shared settings that variant reads, the others at their defaults, and (given the model's config, whose sizes they
    depend on) the variant's defaults."""
    if attention.layers is None:
        return attention
    name, window = attention.layer_entry(layer_index)
    unread = {key: getattr(AttentionConfig(), key) for key in OPTIONAL_KEYS if key not in attention_class(name).reads}
    own = dataclasses.replace(attention, name=name, layers=None, **unread)
    own.window = window or own.window
    if model is None:
        return own
    return dataclasses.replace(model, attention=own).attention  # ModelConfig fills the variant's defaults


def layer_config(config: ModelConfig, layer_index: int) -> ModelConfig:
    """`config` as layer `layer_index` sees it: with the layer's own attention settings (see layer_attention)."""
    return dataclasses.replace(config, attention=layer_attention(config.attention, layer_index, config))


def check_layer(config: ModelConfig, layer_index: int) -> ModelConfig:
    """Layer `layer_index`'s config (see layer_config), refused in one line where its variant would ignore or lacks
    a setting, cannot mask by document, or cannot take the model's sizes. Called where a config enters (every layer,
    by gptmini.config_checks) and by build_attention, so a model built in Python is checked like one built by a
    command."""
    check_attention_config(config.attention, complete=True)
    config = layer_config(config, layer_index)
    check_attention_config(config.attention, complete=True)  # a pattern's layer, with its variant's defaults
    check_doc_mask(config)
    attention_class(config.attention.name).check_sizes(config)
    return config


def build_attention(config: ModelConfig, layer_index: int = 0) -> Attention:
    """Layer `layer_index`'s attention module (0-based): `config.attention.name`, or the layer's entry of the pattern
    model.attention.layers, checked by check_layer."""
    config = check_layer(config, layer_index)
    return attention_class(config.attention.name)(config, layer_index)
