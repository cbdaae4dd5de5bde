"""What resume means for each setting (issue 21, items 5 and 6): what a resumed run logs is what it applies.

The optimizer's state (moments, step counts) comes from the checkpoint; its settings (peak learning rates, weight
decay, betas) come from the current config, and each changed setting is named in the log. What cannot change
(the optimizer and its parameter groups) is refused in one line, and so is a train.max_iters before the
checkpoint's step, before anything of the run is rewritten.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from gptmini.checkpoint import CheckpointError, load_checkpoint
from gptmini.distributed import DistEnv
from gptmini.finite import NonFiniteWeights
from gptmini.run_setup import TrainingError, build_run
from gptmini.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from test_train import make_config  # noqa: E402

TINY = ("model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16", "train.final_eval=false",
        "train.eval_interval=0", "train.attn_interval=0", "train.sample_tokens=0", "train.warmup_iters=1")


@pytest.fixture()
def four_steps(tmp_path) -> dict[str, Path]:
    """A run of 4 AdamW steps at train.lr=3e-3 and optim.weight_decay=0.1."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 200)
    run = tmp_path / "run"
    train(make_config(corpus, tmp_path / "data", *TINY, "train.max_iters=4", "train.lr=3e-3",
                      "optim.weight_decay=0.1"), run)
    return {"corpus": corpus, "data": tmp_path / "data", "run": run}


def test_a_resumed_run_applies_the_new_lr_and_weight_decay_and_says_so(four_steps):
    cfg = make_config(four_steps["corpus"], four_steps["data"], *TINY, "train.max_iters=8", "train.lr=1e-3",
                      "optim.weight_decay=0.05")
    parts = build_run(cfg, four_steps["run"], DistEnv())
    groups = parts.optimizer.param_groups
    assert [g["base_lr"] for g in groups] == [1e-3, 1e-3]
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.05]  # matrices decay; biases and gains never
    saved = load_checkpoint(four_steps["run"] / "checkpoints" / "last.pt")["optimizer"]
    state = parts.optimizer.state_dict()["state"]
    for i, moments in saved["state"].items():  # the moments are the checkpoint's
        assert torch.equal(state[i]["exp_avg"], moments["exp_avg"])
        assert torch.equal(state[i]["exp_avg_sq"], moments["exp_avg_sq"])
    assert "resume: train.lr is now 0.001 (the checkpoint's run had 0.003)" in parts.notes
    assert "resume: optim.weight_decay is now 0.05 (the checkpoint's run had 0.1)" in parts.notes
    assert any(n.startswith("resume: train.max_iters is now 8") for n in parts.notes)


def test_max_iters_before_the_checkpoints_step_is_refused_and_changes_nothing(four_steps):
    run = four_steps["run"]
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    cfg = make_config(four_steps["corpus"], four_steps["data"], *TINY, "train.max_iters=2")
    with pytest.raises(TrainingError, match=r"^train.max_iters=2 is before step 4 of .*last.pt"):
        train(cfg, run)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # config.yaml as it was


@pytest.mark.parametrize(("override", "named"), [
    ("optim.name=muon", "optim.name: checkpoint 'adamw' vs now 'muon'"),
    ("optim.decay_embeddings=false", "optim.decay_embeddings: checkpoint True vs now False"),
])
def test_an_optimizer_of_another_layout_is_refused(four_steps, override, named):
    cfg = make_config(four_steps["corpus"], four_steps["data"], *TINY, "train.max_iters=6", "train.lr=3e-3",
                      "optim.weight_decay=0.1", override)
    with pytest.raises(CheckpointError, match=named):
        train(cfg, four_steps["run"])


def test_a_checkpoint_whose_weights_hold_nan_is_not_resumed(four_steps):
    from gptmini.checkpoint import save_checkpoint

    last = four_steps["run"] / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state.pop("format"), state.pop("version")
    next(iter(state["model"].values()))[0] = float("nan")  # a copied or damaged file: training never saves one
    save_checkpoint(state, last)
    cfg = make_config(four_steps["corpus"], four_steps["data"], *TINY, "train.max_iters=6")
    with pytest.raises(NonFiniteWeights, match=r"last.pt': its weights hold NaN or inf"):
        train(cfg, four_steps["run"])


def test_a_longer_run_re_stretches_the_schedule_or_continues_it_when_asked(four_steps):
    from gptmini.optim import lr_at

    longer = make_config(four_steps["corpus"], four_steps["data"], *TINY, "train.max_iters=8", "train.lr=3e-3",
                         "optim.weight_decay=0.1")
    notes = build_run(longer, four_steps["run"], DistEnv()).notes
    [note] = [n for n in notes if "schedule now spans" in n]
    assert note.startswith("resume: the learning-rate schedule now spans 8 steps instead of 4: lr at step 4 is ")
    assert note.endswith("add train.schedule_iters=4 to continue the checkpoint's schedule")
    assert lr_at(4, longer) > 3e-3 * 0.5  # re-stretched: back up near the peak (cosine at 3/7 of the way)
    kept = make_config(four_steps["corpus"], four_steps["data"], *TINY, "train.max_iters=8", "train.lr=3e-3",
                       "optim.weight_decay=0.1", "train.schedule_iters=4")
    assert not any("schedule now spans" in n for n in build_run(kept, four_steps["run"], DistEnv()).notes)
    min_lr = 3e-3 * kept.train.min_lr_ratio
    assert [lr_at(s, kept) for s in range(4, 8)] == pytest.approx([min_lr] * 4)  # the old schedule's end, kept
    original = make_config(four_steps["corpus"], four_steps["data"], *TINY, "train.max_iters=4", "train.lr=3e-3")
    assert [lr_at(s, kept) for s in range(4)] == [lr_at(s, original) for s in range(4)]


@pytest.mark.parametrize(("damage", "message"), [
    (lambda s: s.pop("optimizer"), r"its 'optimizer' entry is missing or not a dict"),
    (lambda s: s.update(step="4"), r"its 'step' entry is missing or not a int"),
    (lambda s: s["model"].update({"wte.weight": torch.zeros(3, 3)}), r"its weights do not fit the model"),
])
def test_a_damaged_checkpoint_is_one_line_on_resume(four_steps, damage, message):
    from gptmini.checkpoint import save_checkpoint

    last = four_steps["run"] / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state.pop("format"), state.pop("version")
    damage(state)
    save_checkpoint(state, last)
    cfg = make_config(four_steps["corpus"], four_steps["data"], *TINY, "train.max_iters=6")
    with pytest.raises(CheckpointError, match=rf"last.pt' cannot be resumed: {message}"):
        train(cfg, four_steps["run"])


def test_a_checkpoint_written_before_later_fields_existed_still_resumes():
    """Fields added to ModelConfig/AttentionConfig later (doc_mask, gate, sinks, ...) are missing from older
    checkpoints' saved configs; they mean the defaults, so the resume check must not call them differences."""
    import dataclasses

    from gptmini.checkpoint import CheckpointError, check_compatible
    from gptmini.config import ModelConfig

    model = ModelConfig(vocab_size=65)
    old = dataclasses.asdict(model)
    del old["doc_mask"], old["attention"]["gate"], old["attention"]["sinks"]
    saved = {"config": {"model": old}, "tokenizer": {"kind": "char"}}
    check_compatible(saved, model, {"kind": "char"})
    with pytest.raises(CheckpointError, match="model.n_layer"):
        check_compatible(saved, ModelConfig(vocab_size=65, n_layer=2), {"kind": "char"})
    with pytest.raises(CheckpointError, match="model.doc_mask"):  # a new field set differently does differ
        check_compatible(saved, ModelConfig(vocab_size=65, doc_mask=True), {"kind": "char"})
