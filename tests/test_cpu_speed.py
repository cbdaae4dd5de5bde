"""CPU speed (issue 26): the bf16 autocast rule of dtype=auto, its start-up line, the phase times a run logs, and
a default start-up path that loads no heavy library it does not use."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from gptmini.cli import to_dataclass
from gptmini.config import EvalOptions, EvaluateConfig, GenerateConfig, register_configs
from gptmini.device import CPU_BF16_MIN_EMBD, cpu_autocast_dtype, dtype_choice
from gptmini.evaluate import run_evaluation
from gptmini.generate_command import run_generation
from gptmini.paths import LOG_FILE
from gptmini.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from cpu_helpers import APPLE_M1, AVX2_EPYC, GRAVITON3, SAPPHIRE_RAPIDS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.mark.parametrize(("native", "n_embd", "want"), [
    (True, 384, "bfloat16"),  # the baby model: 1.86x faster in bf16 on an AMX Xeon (issue 26)
    (True, CPU_BF16_MIN_EMBD, "bfloat16"),
    (True, CPU_BF16_MIN_EMBD - 1, "float32"),
    (True, 128, "float32"),  # the default model: slower in bf16 on the same Xeon
    (True, 256, "bfloat16"),
    (False, 768, "float32"),  # emulated bf16 is slower at any width
    (False, 64, "float32"),
    (True, None, "float32"),  # no model to judge by
])
def test_cpu_autocast_rule_both_ways(native, n_embd, want):
    name, why = cpu_autocast_dtype(native, n_embd)
    assert name == want
    assert ("no native bf16" in why) == (not native)
    if native and n_embd is not None:
        assert f"n_embd={n_embd}" in why and str(CPU_BF16_MIN_EMBD) in why


@pytest.mark.parametrize(("caps", "n_embd", "want"), [
    (SAPPHIRE_RAPIDS, 384, torch.bfloat16), (SAPPHIRE_RAPIDS, 128, torch.float32), (GRAVITON3, 512, torch.bfloat16),
    (AVX2_EPYC, 384, torch.float32), (APPLE_M1, 384, torch.float32),
])
def test_auto_dtype_on_cpus_follows_capability_and_width(cpu, caps, n_embd, want):
    cpu(caps)
    dtype, why = dtype_choice("auto", CPU, n_embd)
    assert dtype == want and why.startswith("auto: ")
    assert dtype_choice("float32", CPU, n_embd) == (torch.float32, "set by train.dtype=float32")  # asked: kept
    assert dtype_choice("bfloat16", CPU, 16, key="eval.dtype") == (torch.bfloat16, "set by eval.dtype=bfloat16")
    assert dtype_choice("auto", torch.device("mps"), n_embd)[0] == torch.float32
    with pytest.raises(ValueError, match=r"^eval.dtype='half' is unknown; valid: auto, float32, bfloat16, float16$"):
        dtype_choice("half", CPU, n_embd, key="eval.dtype")


def tiny_run(tmp: Path, *overrides: str):
    corpus = tmp / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the cat sat on the mat.\n" for i in range(60)))
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return to_dataclass(compose("train", overrides=[
            "data=text", f"data.path={corpus}", f"data_dir={tmp / 'data'}", "model.n_layer=1", "model.n_head=2",
            "model.block_size=8", "train.batch_size=2", "train.max_iters=2", "train.warmup_iters=1",
            "train.eval_interval=0", "train.attn_interval=0", "train.sample_tokens=0", "train.device=cpu",
            "train.dtype=auto", *overrides,
        ]))


@pytest.mark.parametrize(("n_embd", "want"), [(16, "float32"), (CPU_BF16_MIN_EMBD, "bfloat16")])
def test_training_prints_the_dtype_choice_and_its_phase_times(cpu, tmp_path, n_embd, want):
    cpu(SAPPHIRE_RAPIDS)
    cfg = tiny_run(tmp_path, f"model.n_embd={n_embd}")
    result = train(cfg, tmp_path / "run")
    lines = (tmp_path / "run" / LOG_FILE).read_text().splitlines()
    device = [line for line in lines if "device: CPU" in line]
    assert len(device) == 1, lines
    m = CPU_BF16_MIN_EMBD
    reason = f"native bf16 and n_embd={m} >= {m}" if want == "bfloat16" else f"n_embd=16 < {m}: too narrow"
    assert f"; dtype: {want} (auto: " in device[0] and reason in device[0]
    # The phase times come just before the final line, which stays last (benchmarks/speedrun.py reads both).
    assert lines[-1].endswith(f"final val loss {result.final_val_loss:.4f} (whole split, window 8)")
    assert "time: " in lines[-2] and "start-up " in lines[-2] and "training " in lines[-2]
    assert "(2 steps), evaluation " in lines[-2] and "checkpoints " in lines[-2]
    # evaluate's dtype=auto makes the same choice for the checkpoint's model, and says so on stderr
    # evaluate's eval.dtype=auto and generate's dtype=auto make the same choice for the checkpoint's model, and
    # say so on stderr (generate's stdout is the sample)
    err = io.StringIO()
    sys_stderr, sys.stderr = sys.stderr, err
    try:
        out = run_evaluation(EvaluateConfig(ckpt=str(tmp_path / "run"),
                                            eval=EvalOptions(window=8, device="cpu", dtype="auto")), io.StringIO())
        said = err.getvalue()
        sample = io.StringIO()
        run_generation(GenerateConfig(ckpt=str(tmp_path / "run"), prompt="the", max_new_tokens=3, device="cpu",
                                      dtype="auto"), sample)
    finally:
        sys.stderr = sys_stderr
    assert said.count(f"dtype: {want} (auto: ") == 1
    assert err.getvalue().count(f"dtype: {want} (auto: ") == 2 and "dtype" not in sample.getvalue()
    if want == "float32":  # the same numbers as the run's own final evaluation
        assert out.loss == pytest.approx(result.final_val_loss, abs=1e-6)


HEAVY = ("PIL", "matplotlib", "scipy", "datasets", "transformers", "pandas", "pyarrow", "safetensors", "tiktoken",
         "huggingface_hub")


def test_the_training_path_imports_no_heavy_library_it_does_not_use():
    """What train.py imports before its first step (the command line, the trainer, the run's set-up, the data
    path): none of the libraries that only some features use (pictures, hub data, plots, GPT-2's tokenizer)."""
    code = ("import sys, train, gptmini.run_setup, gptmini.data, gptmini.run_log, gptmini.optim;"
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_speedrun_benchmark_reads_the_phase_line_the_trainer_writes(monkeypatch):
    """benchmarks/speedrun.py tabulates each run's phases from the `time:` line: the two must agree."""
    import time

    from gptmini.phases import PhaseClock

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import speedrun

    clock = PhaseClock(origin=time.perf_counter() - 3.0)
    clock.loop_started()
    with clock.phase("evaluation"):
        pass
    clock.seconds["evaluation"], clock.seconds["checkpoints"] = 0.5, 0.25
    line = clock.summary(steps=360)
    found = speedrun.PHASES.search(f"[2026-12-03 10:00:00] {line}")
    assert found is not None, line
    total, start_up, training, evaluation, checkpoints = map(float, found.groups())
    assert total >= start_up >= 3.0 and (evaluation, checkpoints) == (0.5, 0.25) and training >= 0.0
    assert len(found.groups()) == len(speedrun.PHASE_NAMES)
