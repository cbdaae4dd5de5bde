"""Weights holding NaN or inf are refused where they enter: a checkpoint given to generate, evaluate or export,
and a Hugging Face folder given to `model.init_from` or `ckpt=`; one line naming the file, no 'lower train.lr'."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hf_helpers import hf_gpt2, save_hf
from test_finetune import TEXT, finetune_config
from test_train import make_config

from gptmini.checkpoint import load_checkpoint, load_for_inference, save_checkpoint
from gptmini.config import EvalOptions, EvaluateConfig, ExportConfig, GenerateConfig
from gptmini.evaluate import run_evaluation
from gptmini.export import run_export
from gptmini.generate_command import run_generation
from gptmini.trainer import train

ROOT = Path(__file__).resolve().parents[1]
BAD = "blocks.0.mlp.fc.weight"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A tiny run's last.pt, and copies with one NaN and one inf in a weight."""
    root = tmp_path_factory.mktemp("finite")
    corpus = root / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 100)
    train(make_config(corpus, root / "data", "model.n_layer=1", "model.n_head=2", "model.n_embd=16",
                      "model.block_size=16", "train.max_iters=2", "train.eval_interval=0", "train.attn_interval=0",
                      "train.sample_tokens=0", "train.final_eval=false"), root / "run")
    good = root / "run" / "checkpoints" / "last.pt"
    paths = {"good": good}
    for name, value in (("nan", float("nan")), ("inf", float("-inf"))):
        state = load_checkpoint(good)
        state["model"][BAD][1, 2] = value
        save_checkpoint(state, root / f"{name}.pt")
        paths[name] = root / f"{name}.pt"
    return paths


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_a_checkpoint_holding_nan_or_inf_is_refused_by_every_command(checkpoints, kind, tmp_path):
    bad = checkpoints[kind]
    assert load_for_inference(checkpoints["good"]).model is not None  # the same file, finite, loads
    message = rf"^'{bad}': its weights hold NaN or inf \(first in {BAD}\), so they cannot be used"
    commands = {
        "generate": lambda: run_generation(GenerateConfig(ckpt=str(bad), max_new_tokens=3, device="cpu"), None),
        "evaluate": lambda: run_evaluation(EvaluateConfig(ckpt=str(bad), eval=EvalOptions(device="cpu")), None),
        "export": lambda: run_export(ExportConfig(ckpt=str(bad), out=str(tmp_path / "hf"))),
    }
    for name, command in commands.items():
        with pytest.raises(ValueError, match=message):
            command()
            pytest.fail(f"{name} used weights holding {kind}")
    assert not (tmp_path / "hf").exists()  # export wrote nothing


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory) -> dict[str, Path]:
    """A tiny GPT-2 folder, and a copy whose c_attn weight of layer 1 holds one NaN."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("hf_finite")
    good = save_hf(hf_gpt2(vocab_size=50257, seed=5), root / "good")
    bad = root / "bad"
    shutil.copytree(good, bad)
    tensors = load_file(str(good / "model.safetensors"))
    name = next(k for k in tensors if k.endswith("h.1.attn.c_attn.weight"))
    tensors[name][3, 4] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    return {"good": good, "bad": bad}


def test_a_hugging_face_folder_holding_nan_is_refused(hf_folders, tiktoken_cache, tmp_path):
    good, bad = hf_folders["good"], hf_folders["bad"]
    assert load_for_inference(str(good)).model is not None  # the same folder, finite, loads
    with pytest.raises(ValueError, match=rf"^ckpt={bad}: its weights hold NaN or inf \(first in \S*h.1.attn.c_attn"):
        load_for_inference(str(bad))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    with pytest.raises(ValueError, match=rf"^model.init_from={bad}: its weights hold NaN or inf") as refused:
        train(finetune_config(corpus, tmp_path / "data", bad), tmp_path / "run")
    assert "train.lr" not in str(refused.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_commands_refuse_a_nan_folder_in_one_line(hf_folders, tiktoken_cache, tmp_path):
    bad = hf_folders["bad"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | {"OMP_NUM_THREADS": "1"}
    commands = [
        ([sys.executable, str(ROOT / "train.py"), "data=text", f"data.path={corpus}", "data.tokenizer=tiktoken",
          f"data_dir={tmp_path / 'data'}", f"model.init_from={bad}", "model.block_size=32", "train.max_iters=2",
          "train.device=cpu", f"hydra.run.dir={tmp_path / 'run'}"], f"error: model.init_from={bad}: its weights"),
        ([sys.executable, str(ROOT / "generate.py"), f"ckpt={bad}", "max_new_tokens=3"], f"error: ckpt={bad}: its"),
    ]
    for command, start in commands:
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith(start), done.stderr[-2000:]
        assert "hold NaN or inf" in lines[0] and "train.lr" not in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()  # the refused run left no folder behind (data prepared first)
