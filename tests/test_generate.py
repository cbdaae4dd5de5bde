"""generate.py and gptmini.generate_command on a checkpoint written by the real trainer (trained once per module).

In-process through Hydra's compose API wherever possible; the command line itself (exit codes, one-line errors
on stderr, no traceback) in a few subprocesses, the bad inputs batched into one.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gptmini import GPT, ModelConfig
from gptmini.attention import ATTENTION_REGISTRY, weight_compatible_variants
from gptmini.attention_maps import GAP, MARGIN, MASKED, TITLE_H, TOP, render_grid
from gptmini.checkpoint import load_checkpoint, load_for_inference, save_checkpoint
from gptmini.cli import to_dataclass
from gptmini.config import AttentionConfig, GenerateConfig, register_configs
from gptmini.drawing import SCALE_W
from gptmini.generate_command import SEPARATOR, Continuation, run_generation
from gptmini.heatmap import colorize, heatmap
from gptmini.sampling import generate
from gptmini.tokenizer import ByteTokenizer, CharTokenizer, TokenizerError
from gptmini.trainer import train

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 16
PROMPT = "the quick "


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 2-layer, 2-head sdpa model trained for 30 steps on a repetitive corpus (block_size 16)."""
    tmp = tmp_path_factory.mktemp("gen")
    corpus = tmp / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 300)
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("train", overrides=[
            "data=text", f"data.path={corpus}", f"data_dir={tmp / 'data'}", "model/attention=sdpa",
            "model.n_layer=2", "model.n_head=2", "model.n_embd=32", f"model.block_size={BLOCK}",
            "train.batch_size=8", "train.max_iters=30", "train.warmup_iters=5", "train.lr=3e-3",
            "train.eval_interval=15", "train.eval_iters=2", "train.attn_interval=0", "train.ckpt_interval=15",
            "train.log_interval=10", "train.sample_tokens=0", "train.final_eval=false", "train.device=cpu",
        ])
    train(to_dataclass(cfg), tmp / "run")
    return tmp / "run"


def gen_config(ckpt: Path | str, *overrides: str, **fields) -> GenerateConfig:
    """configs/generate.yaml composed with `overrides` (Hydra syntax), then `fields` set on the dataclass."""
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = to_dataclass(compose("generate", overrides=[f"ckpt={ckpt}", "device=cpu", *overrides]))
    return dataclasses.replace(cfg, **fields)


def generate_text(ckpt, *overrides, **fields) -> tuple[list[str], str]:
    stream = io.StringIO()
    samples = run_generation(gen_config(ckpt, *overrides, **fields), stream=stream)
    return samples, stream.getvalue()


def random_checkpoint(run_dir: Path, path: Path, attention: AttentionConfig, **model) -> Path:
    """A randomly initialised model saved in the trainer's checkpoint layout, with the trained tokenizer."""
    trained = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    cfg = ModelConfig(**{**trained["config"]["model"], "attention": attention, **model})
    torch.manual_seed(0)
    gpt = GPT(cfg)
    save_checkpoint({"model": gpt.state_dict(), "config": {"model": dataclasses.asdict(cfg)},
                     "tokenizer": trained["tokenizer"]}, path)
    return path


# ----------------------------------------------------------------------------------------------------------
# Sampling through run_generation


def test_greedy_text_is_argmax_decoding_and_streamed(run_dir):
    samples, streamed = generate_text(run_dir, prompt=PROMPT, temperature=0.0, max_new_tokens=30)
    model, tok = load_for_inference(run_dir)[:2]
    ids = torch.tensor([tok.encode(PROMPT)])
    for _ in range(30):  # the full model on (at most) the last block_size tokens, no cache
        nxt = model(ids[:, -BLOCK:]).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    new = ids[0, len(PROMPT):].tolist()
    if tok.eot_id in new:
        new = new[: new.index(tok.eot_id)]
    assert samples == [PROMPT + tok.decode(new)]
    assert streamed == samples[0] + "\n"


def test_same_seed_same_text_other_seed_other_text(run_dir):
    a, _ = generate_text(run_dir, prompt=PROMPT, seed=1, max_new_tokens=40, temperature=1.0)
    b, _ = generate_text(run_dir, prompt=PROMPT, seed=1, max_new_tokens=40, temperature=1.0)
    c, _ = generate_text(run_dir, prompt=PROMPT, seed=2, max_new_tokens=40, temperature=1.0)
    assert a == b
    assert a != c


def test_num_samples_run_as_one_batch_and_go_to_out_file(run_dir, tmp_path, monkeypatch):
    batches = []
    forward = GPT.forward

    def spy(self, idx, *args, **kwargs):
        batches.append(idx.shape[0])
        return forward(self, idx, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", spy)
    out = tmp_path / "sub" / "samples.txt"
    samples, streamed = generate_text(run_dir, prompt=PROMPT, num_samples=3, max_new_tokens=20,
                                      temperature=1.0, seed=5, out=str(out))
    assert len(samples) == 3 and all(s.startswith(PROMPT) for s in samples)
    assert len(set(samples)) > 1  # the rows draw independently
    assert set(batches) == {3} and len(batches) <= 20  # one forward per new token, for all rows at once
    assert out.read_text() == SEPARATOR.join(samples) + "\n"
    assert streamed == out.read_text()

    monkeypatch.setattr(GPT, "forward", forward)
    greedy3, _ = generate_text(run_dir, prompt=PROMPT, num_samples=3, max_new_tokens=25, temperature=0.0)
    greedy1, _ = generate_text(run_dir, prompt=PROMPT, num_samples=1, max_new_tokens=25, temperature=0.0)
    assert greedy3 == greedy1 * 3  # each row of the batch equals sampling that row alone


def test_top_k_1_is_greedy(run_dir):
    greedy, _ = generate_text(run_dir, prompt=PROMPT, temperature=0.0, max_new_tokens=25)
    top1, _ = generate_text(run_dir, prompt=PROMPT, temperature=1.5, top_k=1, max_new_tokens=25)
    assert top1 == greedy


def test_stop_string_cuts_the_text_and_never_streams(run_dir):
    (full,), _ = generate_text(run_dir, prompt=PROMPT, temperature=0.0, max_new_tokens=40)
    new = full[len(PROMPT):]
    assert len(new) >= 10, "the greedy continuation is too short to pick a stop string from"
    stop = new[6:9]
    (cut,), streamed = generate_text(run_dir, prompt=PROMPT, temperature=0.0, max_new_tokens=40, stop=stop)
    assert cut == PROMPT + new[: new.index(stop)]
    assert streamed == cut + "\n"
    (whole,), _ = generate_text(run_dir, prompt=PROMPT, temperature=0.0, max_new_tokens=40, stop="never there")
    assert whole == full


def test_end_of_text_stops_each_row(run_dir, monkeypatch):
    """Scripted tokens: row 0 emits end-of-text at step 3, row 1 at step 5, row 2 never."""
    tok = load_for_inference(run_dir).tokenizer
    a, b = tok.encode("a")[0], tok.encode("b")[0]
    script = [[a, a, a, tok.eot_id, a, a, a], [b, b, b, b, b, tok.eot_id, b], [a, b, a, b, a, b, a]]
    steps = []

    def scripted(model, idx, max_new_tokens, **kwargs):
        assert idx.size(0) == len(rows)
        for i in range(max_new_tokens):
            steps.append(i)
            yield torch.tensor([[script[r][i]] for r in rows])  # (N, 1)

    monkeypatch.setattr("gptmini.generate_command.generate_stream", scripted)
    rows = [0, 1, 2]
    samples, streamed = generate_text(run_dir, prompt="x", num_samples=3, max_new_tokens=7)
    assert samples == ["xaaa", "xbbbbb", "xabababa"]
    assert streamed == SEPARATOR.join(samples) + "\n"
    assert len(steps) == 7
    rows, steps = [0, 1], []
    samples, _ = generate_text(run_dir, prompt="x", num_samples=2, max_new_tokens=7)
    assert samples == ["xaaa", "xbbbbb"]
    assert len(steps) == 6  # every row has ended: no more steps are drawn


def test_empty_prompt_starts_from_end_of_text(run_dir):
    (sample,), streamed = generate_text(run_dir, prompt="", temperature=0.0, max_new_tokens=12)
    model, tok = load_for_inference(run_dir)[:2]
    ids = generate(model, torch.tensor([[tok.eot_id]]), 12, temperature=0.0)[0, 1:].tolist()
    if tok.eot_id in ids:
        ids = ids[: ids.index(tok.eot_id)]
    assert sample == tok.decode(ids)
    assert streamed == sample + "\n"


def test_prompt_file_and_long_prompt(run_dir, tmp_path):
    prompt = "the lazy dog. " * 5  # 70 characters, more than block_size
    (tmp_path / "p.txt").write_text(prompt)
    (sample,), _ = generate_text(run_dir, prompt_file=str(tmp_path / "p.txt"), temperature=0.0, max_new_tokens=5)
    (direct,), _ = generate_text(run_dir, prompt=prompt, temperature=0.0, max_new_tokens=5)
    assert sample == direct and sample.startswith(prompt) and len(sample) > len(prompt)
    with pytest.raises(FileNotFoundError, match="prompt_file="):
        generate_text(run_dir, prompt_file=str(tmp_path / "missing.txt"))
    (nothing,), _ = generate_text(run_dir, prompt=PROMPT, max_new_tokens=0, attention_map=str(tmp_path / "a.png"))
    assert nothing == PROMPT
    generate_text(run_dir, prompt=prompt, max_new_tokens=0, attention_map=str(tmp_path / "long.png"))
    with Image.open(tmp_path / "long.png") as img:  # the last block_size tokens: what the model sees
        assert img.size == expected_grid(BLOCK, 2, 2)[0]


def test_prompt_outside_the_char_vocabulary_is_refused(run_dir):
    with pytest.raises(TokenizerError, match="'Z'"):
        generate_text(run_dir, prompt="the Zebra")


def test_compile_without_a_cpu_compiler_is_refused_before_anything_is_printed(run_dir, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    stream = io.StringIO()
    with pytest.raises(ValueError, match=r"^compile=true on CPU needs a C\+\+ compiler .*; use compile=false$"):
        run_generation(gen_config(run_dir, prompt="the", compile=True), stream=stream)
    assert stream.getvalue() == ""


# ----------------------------------------------------------------------------------------------------------
# Attention variants and the KV cache


@pytest.mark.parametrize("variant", [v for v in weight_compatible_variants() if v != "sdpa"])
def test_weight_compatible_variant_gives_the_same_greedy_text(run_dir, variant):
    (sdpa,), _ = generate_text(run_dir, prompt=PROMPT, temperature=0.0, max_new_tokens=30)
    (other,), _ = generate_text(run_dir, f"model/attention={variant}", prompt=PROMPT, temperature=0.0,
                                max_new_tokens=30)
    assert other == sdpa


def test_incompatible_variant_is_refused(run_dir, tmp_path):
    with pytest.raises(ValueError, match=r"model/attention=gqa cannot run weights trained with 'sdpa'"):
        generate_text(run_dir, "model/attention=gqa")
    gqa = random_checkpoint(run_dir, tmp_path / "gqa.pt", AttentionConfig("gqa", n_kv_head=1))
    with pytest.raises(ValueError, match=r"n_kv_head=2 does not match the checkpoint's n_kv_head=1"):
        generate_text(gqa, "model/attention=gqa", "model.attention.n_kv_head=2")  # typed: fixed by the weights
    with pytest.raises(ValueError, match=r"model/attention=mha cannot run weights trained with 'gqa'"):
        generate_text(gqa, "model/attention=mha")


@pytest.mark.parametrize("variant", sorted(ATTENTION_REGISTRY))
def test_kv_cache_on_and_off_same_text_within_and_past_block_size(run_dir, tmp_path, variant):
    if variant in weight_compatible_variants():  # the trained weights, run by this variant
        ckpt, overrides = run_dir, [f"model/attention={variant}"]
    else:  # gqa, swa, mla, linear and diff have their own weights: a random model in the trainer's layout
        reads = ATTENTION_REGISTRY[variant].reads
        attn = AttentionConfig(variant, n_kv_head=1 if "n_kv_head" in reads else None,
                               window=5 if "window" in reads else None)
        ckpt, overrides = random_checkpoint(run_dir, tmp_path / "ckpt.pt", attn), []
    n = 3 * BLOCK  # 10 prompt tokens + 48 new ones: the window slides 42 times
    on, _ = generate_text(ckpt, *overrides, prompt=PROMPT, temperature=0.0, max_new_tokens=n, kv_cache=True)
    off, _ = generate_text(ckpt, *overrides, prompt=PROMPT, temperature=0.0, max_new_tokens=n, kv_cache=False)
    assert on == off
    assert len(on[0]) > BLOCK + 5, "stopped at end-of-text before passing block_size"


# ----------------------------------------------------------------------------------------------------------
# Attention maps


def expected_grid(n_tokens: int, n_layers: int, n_heads: int) -> tuple[tuple[int, int], int]:
    """(width, height) of the grid and one map's side, recomputed from the layout rules: every token gets
    max(12, ceil(256 / T)) pixels (a label's height, and at least 256 px per map); maps in rows of layers, a
    colour scale on the right, the key labels (one character per line) on top."""
    px = max(12, math.ceil(256 / n_tokens))
    cell = n_tokens * px
    return (MARGIN + n_heads * (cell + GAP) + SCALE_W, TOP + n_layers * (cell + TITLE_H + GAP)), cell


def test_attention_map_png_has_the_grid_of_every_layer_and_head(run_dir, tmp_path):
    png = tmp_path / "maps" / "attn.png"
    generate_text(run_dir, prompt=PROMPT, max_new_tokens=1, attention_map=str(png))
    with Image.open(png) as img:
        assert img.format == "PNG"
        assert img.size == expected_grid(len(PROMPT), 2, 2)[0]


def test_attention_map_selection_places_the_chosen_head(run_dir, tmp_path):
    png = tmp_path / "attn.png"
    generate_text(run_dir, prompt=PROMPT, max_new_tokens=1, attention_map=str(png), attention_layers=[1],
                  attention_heads=[1])
    size, cell = expected_grid(len(PROMPT), 1, 1)
    with Image.open(png) as img:
        assert img.size == size
        tile = torch.from_numpy(np.array(img.convert("RGB")))  # (H, W, 3)
    tile = tile[TOP + TITLE_H : TOP + TITLE_H + cell, MARGIN : MARGIN + cell]  # (cell, cell, 3)
    model, tok = load_for_inference(run_dir)[:2]
    with torch.no_grad():
        weights = model(torch.tensor([tok.encode(PROMPT)]), return_weights=True).attentions[1][0, 1]  # (T, T)
    expected = (heatmap(weights, min_size=cell).permute(1, 2, 0) * 255).round().byte()  # layer 1, head 1
    step = cell // len(PROMPT)
    future = torch.ones(len(PROMPT), len(PROMPT), dtype=torch.bool).triu(1)
    future = future.repeat_interleave(step, 0).repeat_interleave(step, 1)
    expected[future] = torch.tensor(MASKED, dtype=torch.uint8)
    assert torch.equal(tile, expected)

    with pytest.raises(ValueError, match=r"attention_layers=\[2\] is out of range; valid: indices 0\.\.1"):
        generate_text(run_dir, prompt=PROMPT, attention_map=str(png), attention_layers=[2])
    with pytest.raises(ValueError, match=r"attention_heads=\[-1\] is out of range"):
        generate_text(run_dir, prompt=PROMPT, attention_map=str(png), attention_heads=[-1])
    with pytest.raises(ValueError, match=r"attention_layers=\[\] selects nothing"):
        generate_text(run_dir, "attention_layers=[]", prompt=PROMPT, attention_map=str(png))


def test_attention_map_absolute_scale_and_its_colour_scale(run_dir, tmp_path):
    """attention_scale=absolute draws the probabilities themselves; beside each row of maps a colour bar runs from
    the map's top colour (1) down to its bottom colour (0)."""
    png = tmp_path / "abs.png"
    generate_text(run_dir, prompt=PROMPT, max_new_tokens=1, attention_map=str(png), attention_layers=[0],
                  attention_heads=[0], attention_scale="absolute")
    size, cell = expected_grid(len(PROMPT), 1, 1)
    with Image.open(png) as img:
        assert img.size == size
        pixels = torch.from_numpy(np.array(img.convert("RGB")))  # (H, W, 3)
    model, tok = load_for_inference(run_dir)[:2]
    with torch.no_grad():
        weights = model(torch.tensor([tok.encode(PROMPT)]), return_weights=True).attentions[0][0, 0]  # (T, T)
    expected = (heatmap(weights, min_size=cell, scale="absolute").permute(1, 2, 0) * 255).round().byte()
    tile = pixels[TOP + TITLE_H : TOP + TITLE_H + cell, MARGIN : MARGIN + cell]
    keep = torch.ones(len(PROMPT), len(PROMPT), dtype=torch.bool).tril()
    keep = keep.repeat_interleave(cell // len(PROMPT), 0).repeat_interleave(cell // len(PROMPT), 1)
    assert torch.equal(tile[keep], expected[keep])
    assert not torch.equal(expected, (heatmap(weights, min_size=cell).permute(1, 2, 0) * 255).round().byte())
    bar_x = MARGIN + cell + GAP + 4
    top, bottom = pixels[TOP + TITLE_H + 6, bar_x].int(), pixels[TOP + TITLE_H + cell - 8, bar_x].int()
    yellow = (colorize(torch.ones(1, 1))[:, 0, 0] * 255).int()
    purple = (colorize(torch.zeros(1, 1))[:, 0, 0] * 255).int()
    assert (top - yellow).abs().max() <= 12 and (bottom - purple).abs().max() <= 12


def test_huge_attention_grid_is_refused_before_drawing():
    n = 800  # 800 tokens x 12 px: one map alone is 9600 px square
    with pytest.raises(ValueError, match=r"800 tokens x 1 layers x 1 heads would be 9734x9721 pixels"):
        render_grid([torch.zeros(1, n, n)], ["x"] * n, [0], [0])


def test_attention_tensorboard_images(run_dir, tmp_path):
    tb = tmp_path / "tb"
    generate_text(run_dir, prompt=PROMPT, max_new_tokens=1, attention_tb=str(tb), attention_layers=[1])
    acc = EventAccumulator(str(tb), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert set(acc.Tags()["images"]) == {"attn/prompt", "attn/layer1/head0", "attn/layer1/head1"}
    grid = acc.Images("attn/prompt")[0]
    assert grid.encoded_image_string.startswith(b"\x89PNG")
    assert (grid.width, grid.height) == expected_grid(len(PROMPT), 1, 2)[0]
    assert "attn/tokens/text_summary" in acc.Tags()["tensors"]


# ----------------------------------------------------------------------------------------------------------
# Incremental decoding


def test_continuation_holds_partial_characters_and_stop_prefixes():
    tok = ByteTokenizer()
    row = Continuation(tok, stop=None)
    released = [row.feed(b) for b in "é!".encode()]  # é is two bytes
    assert released == ["", "é", "!"]

    row = Continuation(CharTokenizer("abcd\n"), stop="\n\n")
    ids = {c: i for i, c in enumerate("abcd\n")}
    assert [row.feed(ids[c]) for c in "ab\nc\n"] == ["a", "b", "", "\nc", ""]
    assert row.feed(ids["\n"]) == "" and row.done  # "\n\n" completed: nothing of it is released
    assert row.text == "ab\nc"

    row = Continuation(CharTokenizer("abcd\n"), stop="\n\n")
    assert [row.feed(ids[c]) for c in "a\n"] == ["a", ""]
    assert row.finish() == "\n" and row.text == "a\n"  # the stop never came: the held text is released
    row = Continuation(CharTokenizer("ab"), stop="ab")
    assert row.feed(2) == "" and row.done and row.text == ""  # end-of-text


# ----------------------------------------------------------------------------------------------------------
# The command line


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.slow
def test_cli_prints_a_continuation_reproducibly(run_dir, tmp_path):
    args = [f"ckpt={run_dir}", "prompt='the '", "max_new_tokens=30", "seed=7", "num_samples=2"]
    first = run_cli(*args, f"out={tmp_path / 's.txt'}")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("the ") and len(first.stdout) > len("the ") + 5
    assert first.stdout == (tmp_path / "s.txt").read_text()
    assert first.stdout.count(SEPARATOR) == 1
    second = run_cli(*args)
    assert second.stdout == first.stdout


# Each: the override(s), and what the one-line message must name.
BAD_INPUTS = [
    (["ckpt={tmp}/missing"], "missing' does not exist"),
    (["ckpt={tmp}/not_a_checkpoint.pt"], "is not a readable gptmini checkpoint"),
    (["ckpt={tmp}/truncated.pt"], "is not a readable gptmini checkpoint"),
    (["ckpt={tmp}/misfit.pt"], "its tensors do not fit its config"),
    (["ckpt={run}", "prompt=Zebra"], "not in the char vocabulary: 'Z'"),
    (["ckpt={run}", "top_p=0"], "top_p=0.0 must be in (0, 1]"),
    (["ckpt={run}", "top_p=1.5"], "top_p=1.5 must be in (0, 1]"),
    (["ckpt={run}", "temperature=-0.5"], "temperature=-0.5 must be >= 0"),
    (["ckpt={run}", "top_k=0"], "top_k=0 must be a positive integer"),
    (["ckpt={run}", "model/attention=gqa"], "model/attention=gqa cannot run weights trained with 'sdpa'"),
    (["ckpt={run}", "device=tpu"], "device='tpu' is unknown"),
    (["ckpt={run}", "dtype=float64"], "dtype='float64' is unknown"),
    (["ckpt={run}", "attention_map={tmp}/a.png", "attention_heads=[7]"], "attention_heads=[7] is out of range"),
]

# Runs generate.py as __main__ once per argument list in one interpreter (one start-up instead of many).
DRIVER = """
import contextlib, io, json, runpy, sys
results = []
for args in json.loads(sys.argv[2]):
    sys.argv = ["generate.py", *args]
    err, code = io.StringIO(), 0
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(SCRIPT, run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code
    except BaseException as escaped:  # would have been a traceback
        code = "traceback: " + repr(escaped)
    results.append({"code": code, "stderr": err.getvalue()})
print(json.dumps(results))
"""


@pytest.mark.slow
def test_bad_input_gets_one_line_and_a_non_zero_exit(run_dir, tmp_path):
    good = run_dir / "checkpoints" / "last.pt"
    (tmp_path / "not_a_checkpoint.pt").write_text("just some text\n")
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    state = load_checkpoint(good)
    state["config"]["model"]["n_embd"] = 48  # the tensors were trained with 32
    save_checkpoint({k: v for k, v in state.items() if k not in ("format", "version")}, tmp_path / "misfit.pt")

    cases = [[a.format(tmp=tmp_path, run=run_dir) for a in args] for args, _ in BAD_INPUTS]
    driver = DRIVER.replace("SCRIPT", repr(str(ROOT / "generate.py")))
    proc = subprocess.run([sys.executable, "-c", driver, "-", json.dumps(cases)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for (args, needle), result in zip(BAD_INPUTS, json.loads(proc.stdout), strict=True):
        lines = result["stderr"].strip().splitlines()
        assert result["code"] == 2, (args, result)
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, result)
        assert needle in lines[0], (args, lines[0])
        assert "Traceback" not in result["stderr"]

    # One for real, as its own process: exit code, one line, no traceback; HYDRA_FULL_ERROR=1 shows it.
    missing = run_cli(f"ckpt={tmp_path / 'missing'}")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [f"error: checkpoint '{tmp_path / 'missing'}' does not exist"]
    full = run_cli(f"ckpt={tmp_path / 'missing'}", env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode != 0 and "Traceback" in full.stderr and "CheckpointError" in full.stderr


def test_a_checkpoint_run_as_its_own_variant_keeps_its_settings(run_dir, tmp_path):
    """`model/attention=swa` on a window-4 checkpoint runs window 4; only a typed model.attention.window wins."""
    ckpt = random_checkpoint(run_dir, tmp_path / "swa.pt", AttentionConfig("swa", window=4))
    chosen = gen_config(ckpt, "model/attention=swa").model.attention
    assert chosen.name == "swa" and chosen.window is None  # the group names the variant, not a window
    assert load_for_inference(ckpt, attention=chosen).model.config.attention.window == 4
    typed = gen_config(ckpt, "model/attention=swa", "model.attention.window=8").model.attention
    assert load_for_inference(ckpt, attention=typed).model.config.attention.window == 8
    samples, _ = generate_text(ckpt, "model/attention=swa", prompt=PROMPT, temperature=0.0, max_new_tokens=12)
    assert samples == generate_text(ckpt, prompt=PROMPT, temperature=0.0, max_new_tokens=12)[0]
    gqa = random_checkpoint(run_dir, tmp_path / "gqa.pt", AttentionConfig("gqa", n_kv_head=1))
    assert load_for_inference(gqa, attention=gen_config(gqa, "model/attention=gqa").model.attention
                              ).model.config.attention.n_kv_head == 1
