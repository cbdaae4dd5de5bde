"""A Hugging Face folder is read without trusting it (issue 21, item 10 and the config.json type errors): sizes
its weights cannot hold, sizes of the wrong type and special files are one line each, before any allocation or
blocking read."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gptmini.hf_folder import parameter_count
from gptmini.pretrained import PretrainedError, load_hf_gpt2

sys.path.insert(0, str(Path(__file__).parent))
from hf_helpers import hf_gpt2, save_hf  # noqa: E402

pytest.importorskip("transformers", reason="the tiny Hugging Face folders need transformers (the dev extra)")


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    model = hf_gpt2()
    folder = save_hf(model, tmp_path_factory.mktemp("hf") / "good")
    cfg, _ = load_hf_gpt2(str(folder))
    assert parameter_count(cfg) == sum(p.numel() for p in model.transformer.parameters())  # the formula is GPT-2's
    return folder


def with_config(good: Path, tmp_path: Path, **changes) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(good, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | changes))
    return folder


@pytest.mark.parametrize("n_layer", [3_000_000, 10**8])
def test_sizes_the_weights_cannot_hold_are_refused_before_allocating(good, tmp_path, n_layer):
    folder = with_config(good, tmp_path, n_layer=n_layer)
    with pytest.raises(PretrainedError, match=rf"config.json describes [\d,]+ parameters \(n_layer={n_layer},"):
        load_hf_gpt2(str(folder))


@pytest.mark.parametrize("value", [None, [2], 2.5, "2", True, 0])
def test_sizes_of_the_wrong_type_are_one_line(good, tmp_path, value):
    folder = with_config(good, tmp_path, n_layer=value)
    refusal = f"config.json sets n_layer={json.dumps(value)}, not a positive integer"
    with pytest.raises(PretrainedError, match=re.escape(refusal)):
        load_hf_gpt2(str(folder))


LOAD = "import sys; from gptmini.pretrained import load_hf_gpt2; load_hf_gpt2(sys.argv[1])"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
@pytest.mark.parametrize("pipe", ["shard", "config.json"])
def test_a_pipe_named_as_a_file_is_refused_not_read(good, tmp_path, pipe):
    folder = tmp_path / "piped"
    shutil.copytree(good, folder)
    if pipe == "shard":  # an index naming a FIFO as its shard
        (folder / "model.safetensors").unlink()
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "shard.safetensors"}}))
        os.mkfifo(folder / "shard.safetensors")
    else:
        (folder / "config.json").unlink()
        os.mkfifo(folder / "config.json")
    proc = subprocess.run([sys.executable, "-c", LOAD, str(folder)], capture_output=True, text=True, timeout=120)
    refusal = {"shard": "shard.safetensors is not a regular file (a pipe, device or folder); not read",
               "config.json": "not a Hugging Face GPT-2 folder, it lacks config.json"}[pipe]
    assert proc.returncode != 0 and refusal in proc.stderr, proc.stderr
