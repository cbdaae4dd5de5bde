"""One rule, one place: the registry checks run where a config enters (and where a model is built), validate()
only checks, and what GPT-2 can hold is one list that model.init_from, ckpt=gpt2 and export all read."""

from __future__ import annotations

import dataclasses

import pytest

from gptmini.config import MLP_KINDS, AttentionConfig, ModelConfig
from gptmini.config_checks import check_config, check_model_config
from gptmini.export import check_exportable
from gptmini.gpt2_format import gpt2_refusal
from gptmini.model import GPT


def test_validate_changes_nothing():
    """Defaults are filled when the config is built; validate() afterwards only looks."""
    cfg = ModelConfig(n_head=4, attention=AttentionConfig("gqa"))
    assert cfg.attention.n_kv_head == 2  # filled in at construction, so a checkpoint records it
    cfg.attention = AttentionConfig("gqa")
    before = dataclasses.asdict(cfg)
    cfg.validate()
    assert dataclasses.asdict(cfg) == before


def test_a_model_built_in_python_is_checked_like_one_built_by_a_command():
    cfg = ModelConfig(attention=AttentionConfig("sdpa", window=4))  # settings alone are fine ...
    with pytest.raises(ValueError, match=r"^model.attention.window=4 is ignored by attention variant 'sdpa'"):
        check_model_config(cfg)  # ... the registry refuses them where the config enters
    with pytest.raises(ValueError, match=r"^model.attention.window=4 is ignored by attention variant 'sdpa'"):
        GPT(cfg)  # and where the model is built


def test_check_config_skips_configs_without_registry_settings():
    check_config(object())  # the data, evaluate and export commands: nothing to ask a registry


SETTINGS = [dict(pos_encoding="rope"), dict(qk_norm=True), dict(logit_softcap=30.0),
            *[dict(mlp=kind) for kind in MLP_KINDS], dict(attention=AttentionConfig("gqa", n_kv_head=2)),
            dict(attention=AttentionConfig("swa", window=8)), dict(attention=AttentionConfig("einsum"))]


@pytest.mark.parametrize("setting", SETTINGS, ids=[str(s) for s in SETTINGS])
def test_init_from_and_export_refuse_the_same_architectures_for_the_same_reason(setting):
    cfg = ModelConfig(n_head=4, n_embd=64, vocab_size=50257, **setting)
    refusal = gpt2_refusal(cfg)
    try:
        check_exportable(cfg, None)
        exported = None
    except ValueError as err:
        exported = str(err)
    try:
        check_model_config(dataclasses.replace(cfg, init_from="gpt2"))
        loaded = None
    except ValueError as err:
        loaded = str(err)
    if refusal is None:
        assert exported is None and loaded is None, (exported, loaded)
    else:
        setting_text, why = refusal
        assert exported == f"cannot export a model with {setting_text} as a Hugging Face GPT-2: it {why}"
        assert loaded == f"model.init_from=gpt2 cannot be combined with {setting_text}: GPT-2 {why}"
