"""Training through Hydra's compose API on tiny models: loss, TensorBoard contents, exact resume, refusals."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gptmini import ATTENTION_REGISTRY
from gptmini import train_step as step_module  # where TrainStep looks up step_unless
from gptmini.checkpoint import CheckpointError, load_checkpoint
from gptmini.cli import to_dataclass
from gptmini.config import register_configs
from gptmini.device import describe, mfu, peak_flops
from gptmini.drawing import SCALE_W
from gptmini.optim import lr_at, make_optimizer
from gptmini.trainer import TrainingError, train

ROOT = Path(__file__).resolve().parents[1]
TRAINABLE = [n for n, cls in ATTENTION_REGISTRY.items() if cls.trains_on_cpu]  # every variant with a CPU backward


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A tiny, very repetitive corpus: a model that learns anything gets its loss down fast."""
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog.\n" * 300)
    return path


def make_config(corpus: Path, data_dir: Path, *overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose(
            "train",
            overrides=[
                "data=text", f"data.path={corpus}", f"data_dir={data_dir}",
                "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
                "train.batch_size=8", "train.max_iters=30", "train.warmup_iters=5", "train.lr=3e-3",
                "train.eval_interval=10", "train.eval_iters=2", "train.attn_interval=15", "train.ckpt_interval=10",
                "train.log_interval=5", "train.sample_tokens=20", "train.probe_tokens=12", "train.device=cpu",
                *overrides,
            ],
        )
    return to_dataclass(cfg)


def scalars(run_dir: Path, tag: str) -> list[float]:
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


@pytest.mark.parametrize("attention", TRAINABLE)
def test_loss_goes_down_for_every_variant(tmp_path, corpus, attention):
    cfg = make_config(corpus, tmp_path / "data", f"model/attention={attention}", "train.attn_interval=0",
                      "train.sample_tokens=0", "train.final_eval=false")
    result = train(cfg, tmp_path / "run")
    losses = scalars(tmp_path / "run", "loss/train")
    assert result.step == 30
    assert losses[-1] < losses[0] - 0.5, losses
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def test_tensorboard_holds_scalars_images_text_and_hparams(tmp_path, corpus):
    run = tmp_path / "run"
    result = train(make_config(corpus, tmp_path / "data"), run)
    acc = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("loss/train", "loss/val", "lr", "grad_norm", "throughput/tokens_per_s", "hparam/final_val_loss"):
        assert tag in tags["scalars"], tag
    assert "mfu" not in tags["scalars"]  # CPU: no peak-FLOPs entry, so MFU is unknown rather than invented
    images = set(tags["images"])
    for layer in range(2):
        assert {f"attn/layer{layer}/head0", f"attn/layer{layer}/head1", f"attn/layer{layer}/all"} <= images
    image = acc.Images("attn/layer0/head0")[-1]
    assert image.encoded_image_string.startswith(b"\x89PNG")
    assert image.height >= 256 and image.width == image.height + SCALE_W  # upscaled square map, its colour scale
    assert len(acc.Images("attn/layer0/head0")) == 2  # steps 15 and 30
    metrics = ("induction", "previous", "entropy", "sink", "self", "distance")  # head diagnostics, same cadence
    assert {f"heads/{m}" for m in metrics} <= images and len(acc.Images("heads/induction")) == 2
    assert any("sample" in t for t in tags["tensors"])
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # one writer per run directory
    assert math.isfinite(result.final_val_loss)
    assert (run / "config.yaml").is_file() and (run / "train.log").is_file()
    assert f"final val loss {result.final_val_loss:.4f}" in (run / "train.log").read_text()
    assert (run / "checkpoints" / "best.pt").is_file()


def test_resume_is_exact(tmp_path, corpus):
    straight = tmp_path / "straight"
    split = tmp_path / "split"
    common = ("model.dropout=0.1", "train.final_eval=false", "train.eval_interval=10")
    train(make_config(corpus, tmp_path / "data", *common), straight)
    first = train(make_config(corpus, tmp_path / "data", *common, "train.stop_after=15"), split)
    assert first.step == 15
    second = train(make_config(corpus, tmp_path / "data", *common), split)
    assert second.step == 30
    a = load_checkpoint(straight / "checkpoints" / "last.pt")
    b = load_checkpoint(split / "checkpoints" / "last.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert scalars(straight, "loss/train")[-3:] == scalars(split, "loss/train")[-3:]


def test_incompatible_resume_is_refused(tmp_path, corpus):
    run = tmp_path / "run"
    train(make_config(corpus, tmp_path / "data", "train.max_iters=5", "train.final_eval=false"), run)
    before = (run / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(CheckpointError, match=r"model.n_embd: checkpoint 32 vs now 64"):
        train(make_config(corpus, tmp_path / "data", "model.n_embd=64"), run)
    assert (run / "checkpoints" / "last.pt").read_bytes() == before


def test_non_finite_steps_are_skipped_and_never_saved(tmp_path, corpus, monkeypatch):
    real = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def flaky(params, max_norm, *args, **kwargs):
        calls["n"] += 1
        norm = real(params, max_norm, *args, **kwargs)
        return torch.tensor(float("nan")) if calls["n"] in (3, 4) else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", flaky)
    run = tmp_path / "run"
    result = train(make_config(corpus, tmp_path / "data", "train.max_iters=10", "train.final_eval=false"), run)
    assert result.skipped_steps == 2
    assert scalars(run, "train/skipped_steps") == [2]  # counted on the device, reported at the next log line
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert state["skipped_steps"] == 2
    assert "steps 1-5: 2 had a non-finite loss or gradient norm and were skipped" in (run / "train.log").read_text()


def test_too_many_non_finite_steps_stop_training(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: torch.tensor(float("inf")))
    with pytest.raises(TrainingError, match=r"5 non-finite steps in a row by step 5 \(train.max_bad_steps=3\)"):
        train(make_config(corpus, tmp_path / "data", "train.max_bad_steps=3"), tmp_path / "run")


def test_a_run_of_non_finite_steps_that_ends_between_two_looks_still_stops_training(tmp_path, corpus, monkeypatch):
    real, calls = torch.nn.utils.clip_grad_norm_, {"n": 0}

    def flaky(params, max_norm, *args, **kwargs):  # steps 1-4 bad, then good again before the first look at 5
        calls["n"] += 1
        norm = real(params, max_norm, *args, **kwargs)
        return torch.tensor(float("nan")) if calls["n"] <= 4 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", flaky)
    with pytest.raises(TrainingError, match=r"4 non-finite steps in a row by step 5 \(train.max_bad_steps=3\)"):
        train(make_config(corpus, tmp_path / "data", "train.max_bad_steps=3"), tmp_path / "run")


def test_non_finite_weights_are_never_saved_and_the_error_names_a_good_checkpoint(tmp_path, corpus, monkeypatch):
    """An update that leaves finite loss and gradients but non-finite weights (a huge lr) must not reach a file."""
    real_step, calls = step_module.step_unless, {"n": 0}

    def corrupting_step(optimizer, bad):
        real_step(optimizer, bad)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].fill_(float("inf"))

    monkeypatch.setattr(step_module, "step_unless", corrupting_step)
    run = tmp_path / "run"
    cfg = make_config(corpus, tmp_path / "data", "train.ckpt_interval=1", "train.max_bad_steps=5",
                      "train.eval_interval=0", "train.attn_interval=0", "train.sample_tokens=0")
    last = run / "checkpoints" / "last.pt"
    with pytest.raises(TrainingError, match=rf"non-finite by step 3, so last.pt was not saved; the last good "
                                            rf"checkpoint is {last} \(step 2\)"):
        train(cfg, run)
    state = load_checkpoint(last)
    assert state["step"] == 2
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_lr_schedule_shape(tmp_path, corpus):
    cfg = make_config(corpus, tmp_path / "data", "train.max_iters=100", "train.warmup_iters=10", "train.lr=1.0",
                      "train.min_lr_ratio=0.1")
    lrs = [lr_at(s, cfg) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warm-up
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.55)  # half-way through the cosine: (1 + 0.1) / 2
    assert lrs[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_weight_decay_only_on_matrices(tmp_path, corpus):
    from gptmini.model import GPT

    cfg = make_config(corpus, tmp_path / "data")
    model = GPT(cfg.model)
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert any(names[id(p)].endswith("ln_1.weight") for p in no_decay["params"])


def test_rocm_device_report_and_mfu(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "AMD Instinct MI300X")
    info = describe(torch.device("cuda"))
    assert info.backend == "ROCm (HIP 6.2.41133), AMD Instinct MI300X"
    assert peak_flops(info.name, torch.bfloat16) == pytest.approx(1307.4e12)
    assert peak_flops("AMD Instinct MI250X", torch.bfloat16) == pytest.approx(191.5e12)  # per GCD
    assert peak_flops("NVIDIA H100 80GB HBM3", torch.float32) == pytest.approx(66.9e12)
    assert peak_flops("Some Future GPU", torch.bfloat16) is None
    assert mfu(1000.0, 1e9, None) is None
    assert mfu(1000.0, 1e9, 1e13) == pytest.approx(0.1)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert describe(torch.device("cuda")).backend == "CUDA 12.8, NVIDIA H100 80GB HBM3"


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16", "train.max_iters=4",
        "train.batch_size=4", "train.eval_iters=1", "train.eval_interval=4", "train.sample_tokens=0",
        "train.attn_interval=0", "train.device=cpu"]


@pytest.mark.slow
def test_sweep_makes_one_run_dir_per_variant(tmp_path, corpus):
    result = run_script("-m", "model/attention=mha,sdpa", "data=text", f"data.path={corpus}",
                        f"data_dir={tmp_path / 'data'}", f"hydra.sweep.dir={tmp_path / 'sweep'}", *TINY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    runs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert runs == ["0_mha", "1_sdpa"]
    for name in runs:
        assert (tmp_path / "sweep" / name / "checkpoints" / "last.pt").is_file()
        assert len(list((tmp_path / "sweep" / name).glob("events.out.tfevents.*"))) == 1
    assert "final val loss" in result.stderr


@pytest.mark.slow
def test_bad_config_fails_at_start_up_with_one_line(tmp_path, corpus):
    run_dir = tmp_path / "run"
    cases = [
        (["model.n_embd=30"], "model.n_embd=30 is not divisible by model.n_head=4"),
        (["model/attention=nope"], "nope"),
        (["train.max_iters=abc"], "max_iters"),
        (["train.no_such_key=1"], "no_such_key"),
        (["model/attention=flex"], "cannot train on CPU"),
    ]
    for overrides, needle in cases:
        result = run_script("data=text", f"data.path={corpus}", f"data_dir={tmp_path / 'data'}",
                            f"hydra.run.dir={run_dir}", "train.device=cpu", *overrides, cwd=tmp_path)
        assert result.returncode != 0, overrides
        assert needle in result.stderr, (overrides, result.stderr)
        assert "Traceback" not in result.stderr, (overrides, result.stderr)
    assert not (run_dir / "checkpoints").exists()


def test_help_lists_config_groups(tmp_path):
    result = run_script("--help", cwd=tmp_path)
    assert result.returncode == 0
    for group in ("model:", "model/attention:", "data:"):
        assert group in result.stdout, result.stdout
    for name in ("sdpa", "gqa", "baby", "gpt2-medium", "python_stdlib"):
        assert name in result.stdout


def test_profile_writes_a_tensorboard_trace(tmp_path, corpus):
    run = tmp_path / "run"
    train(make_config(corpus, tmp_path / "data", "train.max_iters=6", "train.profile=true", "train.final_eval=false",
                      "train.eval_interval=0", "train.attn_interval=0"), run)
    traces = list((run / "profile").glob("*.pt.trace.json*"))
    assert len(traces) == 1
    import json

    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any("aten::" in str(e.get("name", "")) for e in events)  # real operator events were recorded


def test_the_loop_waits_for_the_device_only_when_something_is_due(tmp_path, corpus, monkeypatch):
    """Reads (host syncs) happen at log, evaluation, attention-map and checkpoint steps, and nowhere else."""
    from gptmini.trainer import TrainStep

    real_read, read_at = TrainStep.read, []

    def recording_read(self):
        read_at.append(self.step)
        return real_read(self)

    monkeypatch.setattr(TrainStep, "read", recording_read)
    cfg = make_config(corpus, tmp_path / "data", "train.max_iters=24", "train.log_interval=5", "train.eval_interval=8",
                      "train.attn_interval=12", "train.ckpt_interval=20", "train.final_eval=false")
    result = train(cfg, tmp_path / "run")
    assert result.step == 24
    assert read_at == [5, 8, 10, 12, 15, 16, 20, 24]
    logged = re.findall(r"INFO (step \d+/24): loss", (tmp_path / "run" / "train.log").read_text())
    assert logged == ["step 5/24", "step 10/24", "step 15/24", "step 20/24", "step 24/24"]
