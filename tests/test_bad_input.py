"""Bad input, end to end: every command run as users run it, with one mistake each.

For every case: a non-zero exit code, exactly one `error:` line on stderr naming the bad value, no traceback,
and the run directory of an earlier run (which every train.py case points at) left byte for byte as it was.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from gptmini.checkpoint import load_checkpoint, save_checkpoint
from gptmini.cli import one_line
from gptmini.config import ModelConfig
from gptmini.model import GPT
from gptmini.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from hf_helpers import hf_gpt2, save_hf  # noqa: E402
from test_train import make_config  # noqa: E402  (the shared tiny-run config)

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "train.py")]
GENERATE = [sys.executable, str(ROOT / "generate.py")]
DATA = [sys.executable, "-m", "gptmini.data"]
EVALUATE = [sys.executable, "-m", "gptmini.evaluate"]
EXPORT = [sys.executable, "-m", "gptmini.export"]
COMPARE = [sys.executable, "-m", "gptmini.compare"]
HEADS = [sys.executable, "-m", "gptmini.heads"]
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16", "train.max_iters=2",
        "train.batch_size=2", "train.eval_interval=0", "train.attn_interval=0", "train.sample_tokens=0",
        "train.final_eval=false", "train.device=cpu"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A corpus, an earlier run in `run/` (same tiny model as TINY), and a few broken files."""
    root = tmp_path_factory.mktemp("bad_input")
    corpus = root / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 200)
    (root / "empty.txt").write_text("")
    (root / "short.txt").write_text("tiny")
    (root / "other.txt").write_text("0123456789+-*/=()[]{}\n" * 300)  # another char vocabulary
    run = root / "run"
    train(make_config(corpus, root / "data", "model.n_layer=1", "model.n_head=2", "model.n_embd=16",
                      "model.block_size=16", "train.max_iters=2", "train.final_eval=false"), run)
    (root / "notes.txt").write_text("not a checkpoint")
    (root / "null_text.jsonl").write_text('{"text": "ok"}\n{"text": null}\n')
    (root / "latin1_prompt.txt").write_bytes("Zürich".encode("latin-1"))
    (root / "d2" / "mine").mkdir(parents=True)
    ranks = [(bytes([b]), b) for b in range(256)] + [(b"ab", 256), (b"cd", 256)]  # one rank for two tokens
    (root / "tampered.tiktoken").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks))
    (root / "d2" / "mine" / "notes.txt").write_text("a corpus kept where its dataset would go\n" * 50)
    good = (run / "checkpoints" / "last.pt").read_bytes()
    (root / "truncated.pt").write_bytes(good[: len(good) // 2])
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    state["model"]["wte.weight"][0, 0] = float("nan")
    save_checkpoint(state, root / "nan.pt")
    for key in ("gate", "sinks"):  # the run's model with an output gate / attention sinks (GPT-2 holds neither)
        model = dict(state["config"]["model"], attention={**state["config"]["model"]["attention"], key: True})
        weights = GPT(ModelConfig(**model)).state_dict()
        save_checkpoint({**state, "model": weights, "config": {**state["config"], "model": model}}, root / f"{key}.pt")
    hf = hf_gpt2(vocab_size=211)
    with torch.no_grad():
        hf.transformer.h[0].mlp.c_fc.weight[0, 0] = float("inf")
    save_hf(hf, root / "hf_inf")
    (root / "conf" / "lab").mkdir(parents=True)  # an experiment file with a Hydra callback
    (root / "conf" / "lab" / "callback.yaml").write_text(
        "# @package _global_\nhydra:\n  callbacks:\n    x:\n      _target_: builtins.print\n")
    return {"root": root, "corpus": corpus, "run": run}


def cases(w: dict[str, Path]) -> list[tuple[str, list[str], str]]:
    """(id, command, a string the error line must contain)."""
    root, run = w["root"], w["run"]

    def trainer(*args: str, data: str | None = None) -> list[str]:
        return [*TRAIN, "data=text", f"data.path={data or w['corpus']}", f"data_dir={root / 'data'}",
                f"hydra.run.dir={run}", *TINY, *args]

    gen = [*GENERATE, f"ckpt={run}", "max_new_tokens=5"]

    def elsewhere(*args: str) -> list[str]:  # train.py with its own run directory (or a sweep's)
        return [*TRAIN, "data=text", f"data.path={w['corpus']}", f"data_dir={root / 'data'}", *TINY, *args]

    return [
        ("train: unknown config group", trainer("optimizer=adam"), "optimizer"),
        ("train: unknown group option", trainer("model=gpt5"), "gpt5"),
        ("train: unknown key", trainer("train.max_iter=3"), "max_iter"),
        ("train: wrong type", trainer("train.batch_size=big"), "big"),
        ("train: negative size", trainer("model.n_layer=-2"), "model.n_layer=-2"),
        ("train: zero size", trainer("model.n_embd=0"), "model.n_embd=0"),
        ("train: n_embd not divisible by n_head", trainer("model.n_embd=17"), "model.n_embd=17"),
        ("train: n_head not divisible by n_kv_head", trainer("model/attention=gqa", "model.attention.n_kv_head=3"),
         "n_kv_head=3"),
        ("train: unknown attention variant", trainer("model/attention=bogus"), "bogus"),
        ("train: flex training on CPU", trainer("model/attention=flex", "model.dropout=0"), "flex"),
        ("train: diff with an odd n_head", trainer("model/attention=diff", "model.n_head=1"), "model.n_head=1"),
        ("train: unknown variant in a layer pattern", trainer("model.attention.layers=[nope]"),
         "model.attention.layers=[nope]: 'nope' is not an attention variant"),
        ("train: window on a layer that takes none", trainer("model.attention.layers=[sdpa:8]"),
         "model.attention.layers=[sdpa:8]: 'sdpa:8' gives a window to 'sdpa'"),
        ("train: bad window in a layer pattern", trainer("model.attention.layers=[swa:0]"),
         "model.attention.layers entry 'swa:0'"),
        ("train: empty layer pattern", trainer("model.attention.layers=[]"), "model.attention.layers=[] is empty"),
        ("train: layer pattern longer than n_layer", trainer("model.attention.layers=[swa:4,sdpa]"),
         "model.attention.layers has 2 entries"),
        ("train: unknown device", trainer("train.device=tpu"), "tpu"),
        ("train: unknown tokenizer", trainer("data.tokenizer=wordpiece"), "wordpiece"),
        ("train: missing data", trainer(data=str(root / "missing.txt")), "missing.txt"),
        ("train: empty data", trainer(data=str(root / "empty.txt")), "empty"),
        ("train: data shorter than a block", trainer(data=str(root / "short.txt")), "block_size"),
        ("train: incompatible resume", trainer("model.n_layer=2"), "model.n_layer: checkpoint 1 vs now 2"),
        ("train: checkpoint for another vocabulary", trainer(data=str(root / "other.txt")), "tokenizer"),
        ("generate: missing checkpoint", [*GENERATE, f"ckpt={root / 'nope'}"], "nope"),
        ("generate: not a checkpoint", [*GENERATE, f"ckpt={root / 'notes.txt'}"], "notes.txt"),
        ("generate: truncated checkpoint", [*GENERATE, f"ckpt={root / 'truncated.pt'}"], "truncated.pt"),
        ("generate: prompt outside the vocabulary", [*gen, "prompt=QED"], "'Q'"),
        ("generate: override the grammar cannot read", [*gen, "prompt=Zürich"], "prompt=Zürich"),
        ("generate: top_p above 1", [*gen, "top_p=1.5"], "top_p=1.5"),
        ("generate: top_p zero", [*gen, "top_p=0"], "top_p=0"),
        ("generate: negative temperature", [*gen, "temperature=-1"], "temperature=-1"),
        ("generate: top_k zero", [*gen, "top_k=0"], "top_k=0"),
        ("generate: non weight-compatible variant", [*gen, "model/attention=gqa"], "gqa"),
        ("generate: layer pattern not weight-compatible",
         [*gen, "model/attention=sdpa", "model.attention.layers=[swa]"],
         "model/attention=swa cannot run weights trained with 'sdpa' (layer 0)"),
        ("data: missing path", [*DATA, "data=text", f"data.path={root / 'absent'}", f"data_dir={root / 'd2'}"],
         "absent"),
        ("data: unknown source", [*DATA, "data.source=ftp", f"data_dir={root / 'd2'}"], "ftp"),
        ("evaluate: missing checkpoint", [*EVALUATE, f"ckpt={root / 'gone'}"], "gone"),
        ("evaluate: window larger than the model's block", [*EVALUATE, f"ckpt={run}", "eval.window=999"],
         "eval.window=999"),
        ("evaluate: data with another vocabulary", [*EVALUATE, f"ckpt={run}", "data=text",
                                                    f"data.path={root / 'other.txt'}", f"data_dir={root / 'd3'}"],
         "vocab"),
        ("train: zero grad_accum", trainer("train.grad_accum=0"), "train.grad_accum=0 must be a positive integer"),
        ("train: zero log_interval", trainer("train.log_interval=0"), "train.log_interval=0"),
        ("train: negative max_iters", trainer("train.max_iters=-5"), "train.max_iters=-5"),
        ("train: negative seed", trainer("train.seed=-1"), "train.seed=-1"),
        ("train: window with sdpa", trainer("model.attention.window=4"), "model.attention.window=4 is ignored"),
        ("train: sinks with linear attention", trainer("model/attention=linear", "model.attention.sinks=true"),
         "model.attention.sinks=true is ignored by attention variant 'linear' (linear attention has no softmax"),
        ("generate: linear attention on softmax weights", [*gen, "model/attention=linear"],
         "model/attention=linear cannot run weights trained with 'sdpa'"),
        ("generate: nan temperature", [*gen, "temperature=nan"], "temperature=nan"),
        ("data: too short to split by position", [*DATA, "data=text", f"data.path={root / 'short.txt'}",
                                                  "data.val_fraction=0.9", f"data_dir={root / 'd2'}"],
         "data.val_fraction=0.5"),
        ("data: data_dir is a file", [*DATA, "data=text", f"data.path={w['corpus']}",
                                      f"data_dir={root / 'notes.txt'}"], "data_dir="),
        ("data: data_dir below a file", [*DATA, "data=text", f"data.path={w['corpus']}",
                                         f"data_dir={root / 'notes.txt' / 'sub'}"], "Not a directory"),
        ("train: run directory is a file", elsewhere(f"hydra.run.dir={root / 'notes.txt'}"),
         "is a file, not a directory"),
        ("train: bad value inside a sweep", elsewhere("-m", "train.grad_accum=1,0"), "train.grad_accum=0"),
        ("generate: out is a directory", [*gen, f"out={root}"], "out="),
        ("generate: out below a file", [*gen, f"out={root / 'notes.txt' / 'samples.txt'}"], "which is a file"),
        ("generate: attention_map below a file", [*gen, f"attention_map={root / 'notes.txt' / 'map.png'}"],
         "attention_map="),
        ("generate: prompt_file not UTF-8", [*gen, f"prompt_file={root / 'latin1_prompt.txt'}"],
         "latin1_prompt.txt' is not UTF-8"),
        ("generate: pretrained weights not cached", [*GENERATE, "ckpt=gpt2-xl"], "ckpt=gpt2-xl: not in the local"),
        ("generate: compile without a C++ compiler", ["env", "PATH=/nonexistent", *gen, "compile=true"],
         "compile=true on CPU needs a C++ compiler"),
        ("evaluate: pretrained weights without data", [*EVALUATE, "ckpt=gpt2"], "no training data to fall back on"),
        ("train: unknown pretrained name", elsewhere("model.init_from=gpt3"), "model.init_from='gpt3' is unknown"),
        ("train: pretrained weights with rope", elsewhere("model.init_from=gpt2", "model.pos_encoding=rope"),
         "cannot be combined with model.pos_encoding=rope"),
        ("train: pretrained weights with char data", elsewhere("model.init_from=gpt2"),
         "needs data tokenized with tiktoken gpt2"),
        ("train: pretrained folder that is not one", elsewhere(f"model.init_from={root}", "data.tokenizer=tiktoken"),
         "not a Hugging Face GPT-2 folder"),
        ("train: pretrained weights not cached", elsewhere("model.init_from=gpt2-xl", "data.tokenizer=tiktoken"),
         "model.init_from=gpt2-xl: not in the local Hugging Face cache"),
        ("export: missing checkpoint", [*EXPORT, f"ckpt={root / 'gone'}", f"out={root / 'hf'}"], "gone"),
        ("export: out exists and is not empty", [*EXPORT, f"ckpt={run}", f"out={root}"], "is not empty"),
        ("export: a char vocabulary", [*EXPORT, f"ckpt={run}", f"out={root / 'hf'}"], "cannot export"),
        ("export: unknown dtype", [*EXPORT, f"ckpt={run}", f"out={root / 'hf'}", "dtype=int8"],
         "dtype='int8' is unknown"),
        ("train: qk_norm_gain without qk_norm", trainer("model.qk_norm_gain=true"), "needs model.qk_norm=true"),
        ("train: doc_rope_reset without doc_mask", trainer("model.doc_rope_reset=true"),
         "model.doc_rope_reset=true restarts rotary positions at each document: it needs model.doc_mask=true"),
        ("train: doc_rope_reset with learned positions", trainer("model.doc_mask=true", "model.doc_rope_reset=true"),
         "needs model.doc_mask=true and model.pos_encoding=rope (got doc_mask=true, pos_encoding=learned)"),
        ("train: doc_mask with a variant that cannot mask documents", trainer("model/attention=linear",
                                                                              "model.doc_mask=true"),
         "model.doc_mask=true is not supported by attention variant 'linear'"),
        ("train: eot_id without doc_mask", trainer("model.eot_id=3"),
         "model.eot_id=3 is read only with model.doc_mask"),
        ("train: eot_id not the data's", elsewhere("model.doc_mask=true", "model.eot_id=3"),
         "model.eot_id=3 is not the data's end-of-text id"),
        ("train: zero loss_chunk", trainer("train.loss_chunk=0"), "train.loss_chunk=0"),
        ("train: zero vocab_multiple", trainer("model.vocab_multiple=0"), "model.vocab_multiple=0"),
        ("train: run directory below a file", elsewhere(f"hydra.run.dir={root / 'notes.txt' / 'run'}"),
         "which is a file"),
        ("generate: checkpoint holding NaN", [*GENERATE, f"ckpt={root / 'nan.pt'}"],
         "nan.pt': its weights hold NaN or inf (first in wte.weight)"),
        ("evaluate: checkpoint holding NaN", [*EVALUATE, f"ckpt={root / 'nan.pt'}"], "nan.pt': its weights hold NaN"),
        ("export: checkpoint holding NaN", [*EXPORT, f"ckpt={root / 'nan.pt'}", f"out={root / 'hf'}"],
         "nan.pt': its weights hold NaN"),
        ("generate: Hugging Face folder holding inf", [*GENERATE, f"ckpt={root / 'hf_inf'}"],
         f"ckpt={root / 'hf_inf'}: its weights hold NaN or inf"),
        ("generate: hydra callback in an experiment file", [*gen, f"hydra.searchpath=[file://{root / 'conf'}]",
                                                            "+lab=callback"], "hydra.callbacks.x._target_="),
        ("train: hydra callback in an experiment file", trainer(f"hydra.searchpath=[file://{root / 'conf'}]",
                                                                "+lab=callback"), "_target_ is refused"),
        ("train: _target_ in an override", trainer("+hydra.callbacks.y._target_=os.getcwd"),
         "hydra.callbacks.y._target_='os.getcwd'"),
        ("generate: another config dir", [*gen, "-cd", str(root / "conf")], "-cd: gptmini's commands read"),
        ("data: jsonl text field null", [*DATA, "data=text", f"data.path={root / 'null_text.jsonl'}",
                                         f"data_dir={root / 'd2'}"], "data.text_field="),
        ("data: corpus inside its dataset's folder", [*DATA, "data=text", f"data.path={root / 'd2' / 'mine'}",
                                                      "data.name=mine", f"data_dir={root / 'd2'}"], "lies inside"),
        ("generate: out is the checkpoint it reads", [*gen, f"out={run / 'checkpoints' / 'last.pt'}"],
         "out=" + repr(str(run / "checkpoints" / "last.pt")) + " lies in a run's checkpoints folder"),
        ("generate: attention_map onto a run's config", [*gen, f"attention_map={run / 'config.yaml'}"],
         "is a file of a training run"),
        ("train: resume with max_iters before the checkpoint's step", trainer("train.max_iters=1"),
         "train.max_iters=1 is before step 2"),
        ("train: resume with another optimizer", trainer("optim.name=muon"),
         "optim.name: checkpoint 'adamw' vs now 'muon'"),
        ("data: a URL corpus offline, no local copy", [*DATA, "data=shakespeare_char", f"data_dir={root / 'd2'}"],
         "HF_DATASETS_OFFLINE=1 forbids downloads"),
        ("data: a hub corpus offline", [*DATA, "data=tinystories", f"data_dir={root / 'd2'}"],
         "data.hub_name='roneneldan/TinyStories' could not be loaded"),
        ("data: a tampered .tiktoken file", [*DATA, "data=text", f"data.path={w['corpus']}", "data.tokenizer=tiktoken",
                                             f"data.encoding={root / 'tampered.tiktoken'}", f"data_dir={root / 'd2'}"],
         "rank(s) are given to two tokens"),
        ("train: a run directory name over 255 bytes", elsewhere(f"hydra.run.dir={root / ('r' * 300)}"),
         "has a name of 300 bytes"),
        ("generate: an out= name over 255 bytes", [*gen, f"out={root / ('o' * 256)}"], "has a name of 256 bytes"),
        ("generate: a ckpt= name over 255 bytes", [*GENERATE, f"ckpt={root / ('c' * 260)}"],
         "has a name of 260 bytes"),
        ("data: a data_dir name over 255 bytes", [*DATA, "data=text", f"data.path={w['corpus']}",
                                                  f"data_dir={root / ('d' * 270)}"], "has a name of 270 bytes"),
        ("generate: attention_tb is a file", [*gen, f"attention_tb={root / 'notes.txt'}"],
         "attention_tb="),
        ("generate: attention_tb below a file", [*gen, f"attention_tb={root / 'notes.txt' / 'tb'}"],
         "which is a file"),
        ("generate: num_samples beyond memory", [*gen, "num_samples=1000000000"], "num_samples=1000000000 needs"),
        ("compare: a folder that holds no run", [*COMPARE, str(root / "conf")], "conf' is not a run directory"),
        ("compare: a file", [*COMPARE, str(run), str(root / "notes.txt")], "notes.txt' is not a run directory"),
        ("compare: missing path", [*COMPARE, str(root / "nowhere")], "nowhere' does not exist"),
        ("compare: glob matching nothing", [*COMPARE, str(root / "zz*")], "zz*' matches nothing"),
        ("compare: no paths", COMPARE, "name the runs to compare"),
        ("compare: baseline naming no group", [*COMPARE, str(run), "baseline=gqa"], "baseline='gqa' names no group"),
        ("compare: out is a file", [*COMPARE, str(run), f"out={root / 'notes.txt'}"], "is a file, not a directory"),
        ("compare: out in a run's checkpoints", [*COMPARE, str(run), f"out={run / 'checkpoints'}"],
         "lies in a run's checkpoints folder"),
        ("compare: target not a number", [*COMPARE, str(run), "target=low"], "target=low"),
        ("compare: target nan", [*COMPARE, str(run), "target=nan"], "target=nan must be a finite number"),
        ("heads: missing checkpoint", [*HEADS, f"ckpt={root / 'gone'}"], "gone"),
        ("heads: induction span longer than half the block", [*HEADS, f"ckpt={run}", "heads.induction_len=9"],
         "heads.induction_len=9 repeated twice is longer than the model's block_size=16"),
        ("heads: probe of one token", [*HEADS, f"ckpt={run}", "heads.probe_tokens=1"],
         "heads.probe_tokens=1 must be an integer >= 2"),
        ("heads: negative seed", [*HEADS, f"ckpt={run}", "heads.seed=-1"], "heads.seed=-1"),
        ("heads: unknown device", [*HEADS, f"ckpt={run}", "heads.device=tpu"], "heads.device='tpu' is unknown"),
        ("heads: pretrained weights without probe text", [*HEADS, "ckpt=gpt2"], "no validation text to probe"),
        ("heads: out onto a run's config", [*HEADS, f"ckpt={run}", f"out={run / 'config.yaml'}"],
         "is a file of a training run"),
        ("heads: prompt outside the vocabulary", [*HEADS, f"ckpt={run}", "prompt=QED"], "'Q'"),
        ("generate: unknown attention_scale", [*gen, "attention_scale=log"], "attention_scale='log' is unknown"),
        ("train: mla kv_rank wider than n_embd", trainer("model/attention=mla", "model.attention.kv_rank=17"),
         "model.attention.kv_rank=17 is wider than model.n_embd=16"),
        ("train: mla q_rank wider than n_embd", trainer("model/attention=mla", "model.attention.q_rank=32"),
         "model.attention.q_rank=32 is wider than model.n_embd=16"),
        ("train: mla odd rope_dim", trainer("model/attention=mla", "model.pos_encoding=rope",
                                            "model.attention.rope_dim=3"), "model.attention.rope_dim=3 must be even"),
        ("train: mla rope_dim with learned positions", trainer("model/attention=mla", "model.attention.rope_dim=4"),
         "model.attention.rope_dim=4 sizes a rotary part, which needs model.pos_encoding=rope"),
        ("train: mla with QK-norm", trainer("model/attention=mla", "model.qk_norm=true"),
         "attention variant 'mla' cannot apply QK-norm"),
        ("train: kv_rank with sdpa", trainer("model.attention.kv_rank=8"),
         "model.attention.kv_rank=8 is ignored by attention variant 'sdpa'; only mla reads it"),
        ("train: output gate with torch_mha", trainer("model/attention=torch_mha", "model.attention.gate=true"),
         "model.attention.gate=true is ignored by attention variant 'torch_mha'"),
        ("train: attention sinks with torch_mha", trainer("model/attention=torch_mha", "model.attention.sinks=true"),
         "model.attention.sinks=true is ignored by attention variant 'torch_mha'"),
        ("train: attention sinks not a boolean", trainer("model.attention.sinks=maybe"),
         "model.attention.sinks=maybe"),
        ("generate: output gate on a checkpoint without one",
         [*gen, "model/attention=mha", "model.attention.gate=true"],
         "model.attention.gate=true does not match the checkpoint's gate=false"),
        ("export: a checkpoint with an output gate", [*EXPORT, f"ckpt={root / 'gate.pt'}", f"out={root / 'hf'}"],
         "cannot export a model with model.attention.gate=true as a Hugging Face GPT-2"),
        ("export: a checkpoint with attention sinks", [*EXPORT, f"ckpt={root / 'sinks.pt'}", f"out={root / 'hf'}"],
         "cannot export a model with model.attention.sinks=true as a Hugging Face GPT-2"),
    ]


def run_case(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run one case. Cases run three at a time and many point at the same earlier run, whose lock admits one
    training process at a time: a case refused for that reason (the lock doing its job) is run again."""
    # Never download a GPT-2 or a corpus in a test, nor find one downloaded before.
    offline = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "GPTMINI_CACHE": str(cwd / "no-cache")}
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | offline
    for _ in range(20):
        result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        if "is in use by another training process" not in result.stderr:
            return result
        time.sleep(0.5)
    return result


@pytest.mark.slow
def test_every_bad_input_is_one_clear_line_and_changes_nothing(world):
    before = snapshot(world["run"])
    table = cases(world)
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda case: run_case(case[1], world["root"]), table))
    failures = []
    for (name, _, needle), result in zip(table, results, strict=True):
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        problems = []
        if result.returncode == 0:
            problems.append("exit code 0")
        if len(errors) != 1:
            problems.append(f"{len(errors)} error lines")
        elif needle not in errors[0]:
            problems.append(f"{needle!r} not in {errors[0]!r}")
        if "Traceback" in result.stderr:
            problems.append("traceback")
        if problems:
            failures.append(f"{name}: {', '.join(problems)}\n{result.stderr[-1500:]}")
    assert not failures, "\n\n".join(failures)
    assert snapshot(world["run"]) == before  # no file of the earlier run changed
    # no stray runs
    assert {p.name for p in world["root"].iterdir() if p.is_dir()} <= {"d2", "d3", "data", "run", "hf_inf", "conf"}


@pytest.mark.slow
def test_full_error_shows_the_traceback(world):
    """HYDRA_FULL_ERROR=1 is the documented way to see where an error came from."""
    result = subprocess.run([*TRAIN, "model.n_layer=-2", f"hydra.run.dir={world['run']}"], cwd=world["root"],
                            env=os.environ | {"HYDRA_FULL_ERROR": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" in result.stderr and "model.n_layer=-2" in result.stderr


def test_hydra_messages_are_condensed_to_one_line():
    message = ("In 'train': Could not find 'model/gpt5'\n\nAvailable options in 'model':\n\tbaby\n\tdefault\n"
               "Config search path:\n\tprovider=hydra, path=pkg://hydra.conf\n")
    assert one_line(message) == "In 'train': Could not find 'model/gpt5'. Available options in 'model': baby, default"
    message = "Could not override 'x'.\nTo append to your config use +x=1\nKey 'x' not in 'RunConfig'\n    full_key: x"
    assert one_line(message) == "Could not override 'x'. To append to your config use +x=1. Key 'x' not in 'RunConfig'"
