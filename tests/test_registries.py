"""Every extension point is a registry: a toy attention variant, data source or optimizer registered here is usable
by config with no other edit, and what the rest of gptmini must know about it it reads from the class."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gptmini.attention import ATTENTION_REGISTRY, SDPAttention, check_attention_config, register_attention
from gptmini.backend_probe import probe_attention_kernel
from gptmini.checkpoint import CheckpointError, swap_attention
from gptmini.config import VARIANT_DEFAULTS, AttentionConfig, ModelConfig
from gptmini.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from test_train import corpus, make_config  # noqa: E402, F401  (corpus is a fixture)


@pytest.fixture
def blind_variant():
    """`blind`: sdpa that cannot return its weights, reads model.attention.window (default 5), keeps its own
    weights (not interchangeable) and reports a compiled backend of its own."""

    @register_attention("blind")
    class Blind(SDPAttention):
        returns_weights = False
        weight_compatible = False
        reads = ("window",)
        compiled_backend = "blind-kernel"

        @classmethod
        def with_defaults(cls, attention, n_head):
            return attention if attention.window is not None else AttentionConfig(attention.name, window=5)

        def forward(self, x, kv_cache=None, return_weights=False, rope=None, docs=None):
            return super().forward(x, kv_cache, False, rope, docs)  # never the weights

    yield Blind
    del ATTENTION_REGISTRY["blind"], VARIANT_DEFAULTS["blind"]


def test_a_registered_variant_is_configured_by_its_flags(blind_variant):
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, attention=AttentionConfig("blind"))
    assert cfg.attention.window == 5  # its own default, through ModelConfig
    with pytest.raises(ValueError, match="n_kv_head=2 is ignored by attention variant 'blind'"):
        check_attention_config(AttentionConfig("blind", n_kv_head=2))
    with pytest.raises(CheckpointError, match="cannot run weights trained with 'blind'"):
        swap_attention(AttentionConfig("blind", window=5), AttentionConfig("mha"))
    assert swap_attention(AttentionConfig("blind", window=3), AttentionConfig("blind")).window == 3


def test_the_kernel_probe_asks_the_variant_for_its_compiled_backend(blind_variant):
    import torch

    config = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, attention=AttentionConfig("blind"))
    module = blind_variant(config)
    report = probe_attention_kernel(module, torch.device("cpu"), torch.float32, 8, record=lambda fn: [])
    assert report.backend == "blind-kernel"


def test_a_variant_without_weights_trains_with_no_attention_maps(tmp_path, corpus, blind_variant):  # noqa: F811
    cfg = make_config(corpus, tmp_path / "data", "model.attention.name=blind", "train.max_iters=4",
                      "train.attn_interval=2", "train.eval_interval=0", "train.sample_tokens=0",
                      "train.final_eval=false")
    assert train(cfg, tmp_path / "run").step == 4
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("attention maps: none (attention variant 'blind' returns no weights; "
                     "train.attn_interval=2 is ignored)") == 1


@pytest.fixture
def poem_source():
    """`poem`: a corpus of a few lines given in data.url, one document each (no file, no network)."""
    from gptmini.data import SOURCE_REGISTRY, Source, register_source

    @register_source("poem")
    class Poem(Source):
        def request(self):
            return {"kind": self.name, "lines": self.cfg.url}

        def label(self):
            return "the poem"

        def documents(self, described, log, cache_dir):
            import datasets

            lines = self.cfg.url.split("|")
            return datasets.Dataset.from_dict({"id": [str(i) for i in range(len(lines))], "text": lines})

    yield Poem
    del SOURCE_REGISTRY["poem"]


def test_a_registered_source_prepares_by_config(tmp_path, poem_source):
    from gptmini.config import DataConfig
    from gptmini.data import prepare

    lines = "|".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(20))
    cfg = DataConfig(name="poem", source="poem", url=lines, tokenizer="bytes", val_fraction=0.2)
    messages: list[str] = []
    prepared = prepare(cfg, tmp_path, log=messages.append)
    assert prepared.meta["train_tokens"] > 0 and prepared.meta["val_tokens"] > 0
    assert "from poem (bytes tokenizer)" in messages[0]
    prepare(cfg, tmp_path, log=messages.append)
    assert "is up to date" in messages[-1]  # the fingerprint is the source's own description


def test_an_unknown_source_lists_the_registered_ones(tmp_path, poem_source):
    from gptmini.config import DataConfig
    from gptmini.data import DataError, prepare

    valid = "python_stdlib, files, url, hub, poem"
    with pytest.raises(DataError, match=rf"^data.source='nope' is unknown; valid: {valid}$"):
        prepare(DataConfig(source="nope"), tmp_path)


TINY = ("model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16", "train.final_eval=false",
        "train.eval_interval=0", "train.attn_interval=0", "train.sample_tokens=0", "train.warmup_iters=1")


@pytest.fixture
def sgd_optimizer(tmp_path):
    """`sgd`: torch's SGD, which knows neither found_inf nor step_unless (the host must decide each step)."""
    import torch

    from gptmini.optim import OPTIMIZER_REGISTRY, OptimizerFactory, adamw_groups, register_optimizer

    @register_optimizer("sgd")
    class SGD(OptimizerFactory):
        @classmethod
        def build(cls, model, cfg, device):
            return torch.optim.SGD(adamw_groups(list(model.named_parameters()), cfg), lr=cfg.train.lr,
                                   momentum=cfg.optim.beta1)

    yield SGD
    del OPTIMIZER_REGISTRY["sgd"]


def test_a_registered_optimizer_trains_by_config_and_the_host_sync_is_said_once(tmp_path, corpus, sgd_optimizer):  # noqa: F811
    import torch

    from gptmini.optim import skips_on_device

    run = tmp_path / "run"
    result = train(make_config(corpus, tmp_path / "data", *TINY, "optim.name=sgd", "train.max_iters=3"), run)
    assert result.step == 3
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["config"]["optim"]["name"] == "sgd"
    assert "momentum_buffer" in next(iter(last["optimizer"]["state"].values()))  # SGD's own state
    log = (run / "train.log").read_text()
    assert log.count("note: the optimizer (SGD) cannot skip a non-finite step on the device") == 1
    assert not skips_on_device(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))


def test_fused_adamw_and_muon_skip_on_the_device_and_say_nothing(tmp_path, corpus):  # noqa: F811
    for name in ("adamw", "muon"):
        run = tmp_path / name
        train(make_config(corpus, tmp_path / "data", *TINY, f"optim={name}", "train.max_iters=2"), run)
        assert "cannot skip a non-finite step" not in (run / "train.log").read_text()


def test_a_checkpoint_with_the_old_flat_muon_names_resumes(tmp_path, corpus):  # noqa: F811
    """Checkpoints saved before optim.muon.* held optim.muon_lr, ...: they resume, and a changed Muon setting is
    named by its new name."""
    import torch

    from gptmini.checkpoint import save_checkpoint
    from gptmini.distributed import DistEnv
    from gptmini.run_setup import build_run

    run = tmp_path / "run"
    train(make_config(corpus, tmp_path / "data", *TINY, "optim=muon", "train.max_iters=2"), run)
    path = run / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    optim = state["config"]["optim"]
    optim |= {f"muon_{k}": v for k, v in optim.pop("muon").items()}  # the layout before the registry
    save_checkpoint(state, path)
    cfg = make_config(corpus, tmp_path / "data", *TINY, "optim=muon", "optim.muon.lr=0.01", "train.max_iters=4")
    parts = build_run(cfg, run, DistEnv())
    assert "resume: optim.muon.lr is now 0.01 (the checkpoint's run had 0.02)" in parts.notes
    assert train(cfg, run).step == 4


def test_an_old_optimizer_setting_on_the_command_line_names_its_new_name():
    from gptmini.cli import check_renamed

    with pytest.raises(ValueError, match=r"^optim.muon_lr is now optim.muon.lr \(Muon's settings sit under optim.muon"):
        check_renamed(["optim=muon", "optim.muon_lr=0.01"])
