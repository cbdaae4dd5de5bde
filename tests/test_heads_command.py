"""`python -m gptmini.heads`: a checkpoint's heads measured on a fixed probe, printed and drawn."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from gptmini.cli import to_dataclass
from gptmini.config import HeadsConfig, register_configs
from gptmini.drawing import CELL_W, LABEL_W, SCALE_W
from gptmini.heads import run_heads
from gptmini.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from hf_helpers import hf_gpt2, save_hf  # noqa: E402
from test_train import make_config  # noqa: E402  (the shared tiny-run config)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("heads")
    corpus = tmp / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 300)
    train(make_config(corpus, tmp / "data", "train.attn_interval=0", "train.sample_tokens=0",
                      "train.final_eval=false", "train.eval_interval=0"), tmp / "run")
    return tmp / "run"


def heads_config(*overrides: str) -> HeadsConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return to_dataclass(compose("heads", overrides=list(overrides)))


def measure(*overrides: str) -> tuple[str, object]:
    stream = io.StringIO()
    report = run_heads(heads_config(*overrides), stream=stream)
    return stream.getvalue(), report


def test_a_checkpoint_gets_its_table_and_picture_on_the_validation_text(run_dir, tmp_path):
    png = tmp_path / "heads.png"
    text, report = measure(f"ckpt={run_dir}", f"out={png}")
    assert "probe 4 x 32 tokens" in text  # heads.probe_rows windows of the val split, cut to block_size 32
    for head in ("L0H0", "L0H1", "L1H0", "L1H1"):
        assert f"\n{head} " in text
    assert "notable:" in text and f"wrote {png}" in text
    assert set(report.scores) == {"entropy", "sink", "previous", "self", "distance", "induction"}
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width == 2 * (LABEL_W + 2 * CELL_W + 6 + SCALE_W + 12)  # 2 grids a row
    again, _ = measure(f"ckpt={run_dir}", f"out={png}")
    assert again == text  # a fixed probe: the same numbers every time


def test_a_prompt_probe_and_no_picture(run_dir, tmp_path):
    text, _ = measure(f"ckpt={run_dir}", "prompt='the lazy dog. the lazy dog.'", "out=null")
    assert "probe 1 x 27 tokens" in text and "wrote" not in text


def test_a_hugging_face_folder_with_a_prompt(tmp_path, tiktoken_cache):
    folder = save_hf(hf_gpt2(vocab_size=50257, seed=5), tmp_path / "hf")
    text, report = measure(f"ckpt={folder}", "prompt='The cat sat on the mat. The cat sat on the mat.'",
                           f"out={tmp_path / 'hf.png'}", "heads.induction_len=16")
    assert report.scores["induction"].shape == (2, 4) and "L1H3" in text
    assert (tmp_path / "hf.png").is_file()


def test_refusals_name_the_key(run_dir, tmp_path):
    with pytest.raises(ValueError, match=r"heads.induction_len=17 repeated twice is longer than the model's "
                                         r"block_size=32; use at most 16"):
        measure(f"ckpt={run_dir}", "heads.induction_len=17", "out=null")
    with pytest.raises(ValueError, match=r"ckpt=gpt2 is pretrained weights, with no validation text to probe"):
        measure("ckpt=gpt2")
    with pytest.raises(ValueError, match=r"heads.probe_tokens=1 must be an integer >= 2"):
        heads_config(f"ckpt={run_dir}", "heads.probe_tokens=1")
    with pytest.raises(ValueError, match=r"prompt='t' is 1 token\(s\); the probe needs at least 2"):
        measure(f"ckpt={run_dir}", "prompt=t", "out=null")


def test_the_command_line(run_dir, tmp_path):
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "gptmini.heads", f"ckpt={run_dir}", f"out={tmp_path / 'h.png'}"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "notable:" in result.stdout and (tmp_path / "h.png").is_file()
