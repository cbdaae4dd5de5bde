"""Config validation: every bad value is refused when the config is built, in one line that names the key the
user typed and the valid range; settings the chosen attention variant would silently ignore are refused too (by
gptmini.config_checks, which asks the attention registry, where a config enters: `check_model_config` here)."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hydra import compose, initialize_config_dir

from gptmini.cli import CONFIG_DIR, check_overrides, to_dataclass
from gptmini.config import (
    AttentionConfig,
    GenerateConfig,
    ModelConfig,
    MuonConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    register_configs,
)
from gptmini.config_checks import check_model_config, check_run_config


def compose_train(*overrides: str) -> RunConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return to_dataclass(compose("train", overrides=list(overrides)))


def refused(build, message: str) -> str:
    """Build, expect a ValueError containing `message` on one line; return the message."""
    with pytest.raises(ValueError) as err:
        build()
    text = str(err.value)
    assert message in text and "\n" not in text, text
    return text


def checked(model: ModelConfig) -> ModelConfig:
    """`model` after the registry checks every command runs where its config enters."""
    check_model_config(model)
    return model


# (field, bad value, what the message must contain)
TRAIN_CASES = [
    ("grad_accum", 0, "train.grad_accum=0 must be a positive integer (>= 1)"),
    ("grad_accum", True, "train.grad_accum=True must be a positive integer"),
    ("batch_size", 0, "train.batch_size=0 must be a positive integer (>= 1)"),
    ("max_iters", -5, "train.max_iters=-5 must be a non-negative integer (>= 0)"),
    ("stop_after", 0, "train.stop_after=0 must be a positive integer (>= 1) or null"),
    ("eval_iters", 0, "train.eval_iters=0 must be a positive integer"),
    ("log_interval", 0, "train.log_interval=0 must be a positive integer"),
    ("ckpt_interval", 0, "train.ckpt_interval=0 must be a positive integer"),
    ("eval_interval", -1, "train.eval_interval=-1 must be a non-negative integer (>= 0) (0: never)"),
    ("attn_interval", -1, "train.attn_interval=-1 must be a non-negative integer"),
    ("warmup_iters", -1, "train.warmup_iters=-1 must be a non-negative integer"),
    ("seed", -1, "train.seed=-1 must be an integer in [0, 2147483647]"),
    ("seed", 2**40, f"train.seed={2**40} must be an integer in [0, 2147483647]"),
    ("lr", 0.0, "train.lr=0.0 must be a finite number > 0"),
    ("lr", -1e-3, "train.lr=-0.001 must be a finite number > 0"),
    ("lr", math.inf, "train.lr=inf must be a finite number > 0"),
    ("lr", math.nan, "train.lr=nan must be a finite number > 0"),
    ("min_lr_ratio", 1.5, "train.min_lr_ratio=1.5 must be a finite number in [0, 1]"),
    ("min_lr_ratio", -0.1, "train.min_lr_ratio=-0.1 must be a finite number in [0, 1]"),
    ("grad_clip", -1.0, "train.grad_clip=-1.0 must be a finite number >= 0 (0 disables clipping)"),
    ("grad_clip", math.nan, "train.grad_clip=nan must be a finite number >= 0"),
    ("max_bad_steps", 0, "train.max_bad_steps=0 must be a positive integer"),
    ("sample_tokens", -1, "train.sample_tokens=-1 must be a non-negative integer"),
    ("probe_tokens", 0, "train.probe_tokens=0 must be a positive integer"),
    ("eval_window", 0, "train.eval_window=0 must be a positive integer (>= 1) or null"),
    ("decay_frac", 1.5, "train.decay_frac=1.5 must be a finite number in [0, 1]"),
    ("lr_schedule", "step", "train.lr_schedule='step' is unknown; valid: cosine, wsd"),
    ("device", "tpu", "train.device='tpu' is unknown; valid: auto, cpu, cuda, mps"),
    ("dtype", "float64", "train.dtype='float64' is unknown; valid: auto, float32, bfloat16, float16"),
    ("strategy", "zero", "train.strategy='zero' is unknown; valid: auto, ddp, fsdp"),
    ("resume", "", "train.resume='' must be auto, never, or the path of a checkpoint"),
    ("dist_timeout_s", 0.0, "train.dist_timeout_s=0.0 must be a finite number > 0"),
]


@pytest.mark.parametrize(("key", "value", "message"), TRAIN_CASES, ids=[f"{k}={v!r}" for k, v, _ in TRAIN_CASES])
def test_train_config_refuses(key, value, message):
    refused(lambda: TrainConfig(**{key: value}), message)


OPTIM_CASES = [
    ("beta1", 1.0, "optim.beta1=1.0 must be a finite number in [0, 1)"),
    ("beta2", -0.1, "optim.beta2=-0.1 must be a finite number in [0, 1)"),
    ("eps", 0.0, "optim.eps=0.0 must be a finite number > 0"),
    ("weight_decay", -0.1, "optim.weight_decay=-0.1 must be a finite number >= 0"),
    ("muon.weight_decay", -1.0, "optim.muon.weight_decay=-1.0 must be a finite number >= 0"),
    ("muon.lr", math.nan, "optim.muon.lr=nan must be a finite number >= 0"),
    ("muon.momentum", 1.0, "optim.muon.momentum=1.0 must be a finite number in [0, 1)"),
    ("muon.ns_steps", 0, "optim.muon.ns_steps=0 must be a positive integer"),
    ("muon.ns_dtype", "float16", "optim.muon.ns_dtype='float16' is unknown; valid: auto, float32, bfloat16"),
]


@pytest.mark.parametrize(("key", "value", "message"), OPTIM_CASES, ids=[f"{k}={v!r}" for k, v, _ in OPTIM_CASES])
def test_optim_config_refuses(key, value, message):
    section, _, name = key.rpartition(".")  # optim.muon.* settings sit in OptimConfig.muon
    refused(lambda: OptimConfig(**{name: value}) if not section else OptimConfig(muon=MuonConfig(**{name: value})),
            message)


def test_an_unregistered_optimizer_is_refused_where_the_config_enters():
    """Which optimizers exist, the registry says (gptmini.optim), asked by gptmini.config_checks."""
    refused(lambda: check_run_config(RunConfig(optim=OptimConfig(name="sgd"))),
            "optim.name='sgd' is unknown; valid: adamw, muon")


def test_defaults_and_edge_values_are_accepted():
    RunConfig()
    TrainConfig(max_iters=0, warmup_iters=0, eval_interval=0, attn_interval=0, sample_tokens=0, grad_clip=0.0,
                min_lr_ratio=0.0, decay_frac=1.0, seed=0, stop_after=None, eval_window=None, resume="/a/last.pt")
    TrainConfig(seed=2**31 - 1, min_lr_ratio=1.0, lr=1, lr_schedule="wsd", strategy="fsdp", device="cpu")
    OptimConfig(name="muon", beta1=0.0, weight_decay=0.0, muon=MuonConfig(ns_dtype="bfloat16", ns_steps=1))


def test_run_config_cross_checks_name_both_keys():
    model = ModelConfig(block_size=64)
    refused(lambda: RunConfig(model=model, train=TrainConfig(eval_window=65)),
            "train.eval_window=65 is larger than model.block_size=64")
    RunConfig(model=model, train=TrainConfig(eval_window=64))
    refused(lambda: check_run_config(RunConfig(optim=OptimConfig(name="muon"), train=TrainConfig(strategy="fsdp"))),
            "optim.name=muon cannot be combined with train.strategy=fsdp")


def test_cross_checks_run_when_hydra_composes():
    refused(lambda: compose_train("model.block_size=32", "train.eval_window=64"),
            "train.eval_window=64 is larger than model.block_size=32")
    refused(lambda: compose_train("train.grad_accum=0"), "train.grad_accum=0 must be a positive integer")


# ----------------------------------------------------------------------------------------------------------
# Attention settings only some variants read


@pytest.mark.parametrize("name", ["sdpa", "mha", "flex", "gqa", "einsum", "wrapper", "fused_qkv", "torch_mha"])
def test_window_is_refused_where_it_would_be_ignored(name):
    text = refused(lambda: checked(ModelConfig(attention=AttentionConfig(name, window=4))),
                   f"model.attention.window=4 is ignored by attention variant '{name}'")
    assert "only swa reads it" in text and "model/attention=swa" in text


@pytest.mark.parametrize("name", ["sdpa", "mha", "swa", "flex"])
def test_n_kv_head_is_refused_where_it_would_be_ignored(name):
    # Even n_kv_head == n_head: the variant never reads it (and the optimizer's Q/K/V split would follow it).
    refused(lambda: checked(ModelConfig(n_head=4, attention=AttentionConfig(name, n_kv_head=4,
                                                                           window=3 if name == "swa" else None))),
            f"model.attention.n_kv_head=4 is ignored by attention variant '{name}'; only gqa reads it")


def test_attention_settings_the_variant_reads_are_accepted():
    ModelConfig(n_head=4, attention=AttentionConfig("gqa", n_kv_head=2))
    assert ModelConfig(n_head=4, attention=AttentionConfig("gqa")).attention.n_kv_head == 2  # default: half
    assert ModelConfig(n_head=6, n_embd=96, attention=AttentionConfig("gqa")).attention.n_kv_head == 3
    ModelConfig(attention=AttentionConfig("swa", window=8))
    assert ModelConfig(attention=AttentionConfig("swa")).attention.window == 64  # the default window
    refused(lambda: checked(ModelConfig(attention=AttentionConfig("bogus"))), "unknown attention variant 'bogus'")
    refused(lambda: AttentionConfig("swa", window=0), "model.attention.window=0 must be a positive integer")


def test_checkpoint_dicts_are_checked_too():
    cfg = dataclasses.asdict(ModelConfig(attention=AttentionConfig("swa", window=8)))
    assert ModelConfig(**cfg).attention.window == 8
    cfg["attention"]["name"] = "sdpa"
    refused(lambda: checked(ModelConfig(**cfg)), "model.attention.window=8 is ignored by attention variant 'sdpa'")


@pytest.mark.parametrize("variant", ["sdpa", "mha", "einsum", "flex", "gqa", "swa", "torch_mha", "wrapper",
                                     "fused_qkv", "linear"])
def test_every_attention_config_group_composes(variant):
    """Each configs/model/attention/*.yaml sets only what its variant reads (the others are null)."""
    run = compose_train(f"model/attention={variant}")
    assert run.model.attention.name == variant


def test_window_typed_by_the_user_is_refused_when_composed():
    refused(lambda: compose_train("model.attention.window=4"), "model.attention.window=4 is ignored")
    refused(lambda: compose_train("model/attention=sdpa", "model.attention.window=64"),
            "model.attention.window=64 is ignored by attention variant 'sdpa'")
    assert compose_train("model/attention=swa").model.attention.window == 64  # filled in, recorded as applied
    assert compose_train("model/attention=swa", "model.attention.window=4").model.attention.window == 4


# ----------------------------------------------------------------------------------------------------------
# generate.py's settings


@pytest.mark.parametrize(("key", "value", "message"), [
    ("temperature", math.nan, "temperature=nan must be >= 0 and finite"),
    ("temperature", math.inf, "temperature=inf must be >= 0 and finite"),
    ("temperature", -1.0, "temperature=-1.0 must be >= 0"),
    ("top_p", math.nan, "top_p=nan must be in (0, 1]"),
    ("top_p", 0.0, "top_p=0.0 must be in (0, 1]"),
    ("top_k", 0, "top_k=0 must be a positive integer"),
])
def test_generate_config_refuses(key, value, message):
    refused(lambda: GenerateConfig(ckpt="run", **{key: value}), message)


# ----------------------------------------------------------------------------------------------------------
# The entry points: one line, exit code 2, before Hydra starts


@pytest.mark.parametrize(("config", "override", "message"), [
    ("train", "train.log_interval=0", "error: train.log_interval=0 must be a positive integer (>= 1)"),
    ("train", "train.max_iters=-5", "error: train.max_iters=-5 must be a non-negative integer"),
    ("train", "model.attention.window=4", "error: model.attention.window=4 is ignored by attention variant 'sdpa'"),
    ("generate", "temperature=nan", "error: temperature=nan must be >= 0 and finite"),
])
def test_check_overrides_prints_one_line_and_exits_2(capsys, config, override, message):
    args = [override] if config == "train" else ["ckpt=somewhere", override]
    with pytest.raises(SystemExit) as exit_:
        check_overrides(config, args)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines
