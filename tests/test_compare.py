"""`python -m gptmini.compare`: the report's numbers are the runs' own, groups form by the differing setting, the
statistics are scipy's, and broken, running or foreign folders never break the report."""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gptmini.checkpoint import load_for_inference
from gptmini.compare import compare, mean_curve, run_comparison, split_paths
from gptmini.comparison import welch_p
from gptmini.config import CompareConfig
from gptmini.run_lock import PID_NAME
from gptmini.run_log import (
    HPARAM_FINAL_VAL_LOSS,
    HPARAM_PEAK_MEMORY,
    TAG_PEAK_MEMORY,
    TAG_TOKENS_PER_S,
    TAG_VAL_LOSS,
    TensorBoard,
    final_metrics,
    to_yaml,
)
from gptmini.run_records import Series, read_run
from gptmini.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from test_train import make_config  # noqa: E402  (the shared tiny-run config)

TINY = ("model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16", "train.batch_size=4",
        "train.max_iters=10", "train.eval_interval=5", "train.attn_interval=0", "train.sample_tokens=0",
        "train.ckpt_interval=10", "train.log_interval=2")  # five throughputs: their median is not their mean
PLANTED_PEAK = 123 << 20  # run a's final peak memory, written over what (if anything) its trainer wrote


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Three tiny real runs: a and b differ only in their seed, c also in its learning rate."""
    root = tmp_path_factory.mktemp("compare")
    corpus = root / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 200)
    for name, overrides in (("a", ["train.seed=1"]), ("b", ["train.seed=2"]), ("c", ["train.seed=1", "train.lr=1e-3"])):
        train(make_config(corpus, root / "data", *TINY, *overrides), root / "sweep" / name)
    tb = TensorBoard(root / "sweep" / "a")
    tb.scalars({HPARAM_PEAK_MEMORY: PLANTED_PEAK}, 0)  # a later events file: its value for step 0 wins
    tb.close()
    return root / "sweep"


def logged(run: Path, tag: str) -> list[tuple[int, float, float]]:
    """(step, value, wall_time) of every event of `tag`, read here independently of gptmini's reader."""
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def span(events: Path) -> float:
    """From an events file's first event to its last scalar: one invocation's share of a run's wall time."""
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    return max(e.wall_time for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)) - acc.FirstEventTimestamp()


def test_the_report_shows_what_each_run_logged(sweep):
    result = compare(CompareConfig(paths=[str(sweep)]))
    rows = {row["run"]: row for row in result.run_rows}
    assert set(rows) == {"a", "b", "c"}
    for name, row in rows.items():
        run = sweep / name
        assert row["status"] == "finished"
        assert row["final_val_loss"] == logged(run, HPARAM_FINAL_VAL_LOSS)[-1][1]
        assert row["best_val_loss"] == min(v for _, v, _ in logged(run, TAG_VAL_LOSS))
        assert row["tokens_per_s"] == statistics.median(v for _, v, _ in logged(run, TAG_TOKENS_PER_S))
        assert row["steps"] == 10 and row["tokens"] == 10 * 4 * 16  # steps x batch x block
        assert row["skipped_steps"] == 0
        assert row["parameters"] == load_for_inference(run, "cpu").model.num_parameters()
        assert row["seed"] == (2 if name == "b" else 1)
        assert row["wall_time_s"] == pytest.approx(sum(map(span, sorted(run.glob("events.out.tfevents.*")))))
        assert f"{row['final_val_loss']:.4f}" in result.markdown
        final_peak, peaks = logged(run, HPARAM_PEAK_MEMORY), [v for _, v, _ in logged(run, TAG_PEAK_MEMORY)]
        assert row["peak_memory_bytes"] == (final_peak[-1][1] if final_peak else max(peaks, default=None))
    assert rows["a"]["peak_memory_bytes"] == PLANTED_PEAK and "123.0 MiB" in result.markdown


def test_groups_form_by_the_setting_that_differs(sweep):
    result = compare(CompareConfig(paths=[str(sweep / "*")]))
    assert [(g.label, [r.path.name for r in g.runs]) for g in result.groups] == [
        ("train.lr=0.003", ["a", "b"]), ("train.lr=0.001", ["c"])]
    header = result.markdown.splitlines()[2]
    assert "| train.lr |" in header and "train.seed" not in header  # the seed has its own column
    stats_a = result.group_rows[0]
    losses = [read_run(sweep / n).final_val_loss for n in ("a", "b")]
    assert stats_a["n"] == 2
    assert stats_a["final_val_loss_mean"] == pytest.approx(statistics.mean(losses))
    assert stats_a["final_val_loss_std"] == pytest.approx(statistics.stdev(losses))  # sample std, ddof=1


def fake_run(path: Path, final: float | None, seed: int, lr: float = 1e-3, *, steps: int = 10,
             val: list[float] | None = None, stop_after: int | None = None) -> Path:
    """A run directory written with the trainer's own writer: val loss every 5 steps (`val`, else 2.5, 2.0), then
    (unless `final` is None) the final metrics. No training: the numbers are exactly the ones given."""
    config = {"train": {"seed": seed, "lr": lr, "max_iters": 10, "batch_size": 2, "grad_accum": 1,
                        "stop_after": stop_after},
              "model": {"block_size": 8, "n_layer": 1, "n_head": 1, "n_embd": 8, "vocab_size": 11}}
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(to_yaml(config))
    tb = TensorBoard(path)
    val = val or [3.0 - step / 10 for step in range(5, steps + 1, 5)]
    for i, loss in enumerate(val):
        tb.scalars({TAG_VAL_LOSS: loss, TAG_TOKENS_PER_S: 1000.0 + i}, 5 * (i + 1))
    if final is not None:
        tb.write_final_metrics(config, final_metrics(final, [1000.0], tb.started, 42 << 20))
    tb.close()
    return path


def test_p_value_is_welchs_from_scipy(tmp_path):
    base = [2.00, 2.10, 2.30]
    other = [2.50, 2.45, 2.70, 2.52]
    for i, loss in enumerate(base):
        fake_run(tmp_path / f"base{i}", loss, seed=i, lr=1e-3)
    for i, loss in enumerate(other):
        fake_run(tmp_path / f"other{i}", loss, seed=i, lr=3e-3)
    result = compare(CompareConfig(paths=[str(tmp_path)], baseline="0.001"))
    by_label = {row["group"]: row for row in result.group_rows}
    base, other = ([float(np.float32(x)) for x in xs] for xs in (base, other))  # as TensorBoard stores them
    expected = stats.ttest_ind(other, base, equal_var=False).pvalue
    assert by_label["train.lr=0.003"]["p_loss"] == pytest.approx(expected, rel=1e-12)
    assert expected != pytest.approx(stats.ttest_ind(other, base).pvalue, rel=1e-3)  # the test tells them apart
    assert by_label["train.lr=0.001"]["p_loss"] is None  # the baseline against itself
    assert by_label["train.lr=0.003"]["final_val_loss_std"] == pytest.approx(statistics.stdev(other))
    assert "baseline" in result.markdown
    assert welch_p([1.0], [1.0, 2.0]) is None  # one seed has no spread to test against


def test_crashed_running_and_half_written_runs_show_as_such(tmp_path):
    fake_run(tmp_path / "done1", 2.0, seed=1)
    fake_run(tmp_path / "done2", 2.2, seed=2, stop_after=5)  # stopped once, resumed: still one of the seeds
    fake_run(tmp_path / "crashed", None, seed=3, steps=5)
    fake_run(tmp_path / "no_final", None, seed=7)  # reached max_iters, died in the final evaluation
    running = fake_run(tmp_path / "running", None, seed=4, steps=5)
    (running / PID_NAME).write_text(f"{os.getpid()}\n")  # a live process holds it
    cut = fake_run(tmp_path / "cut", None, seed=5)
    events = next(cut.glob("events.out.tfevents.*"))
    events.write_bytes(events.read_bytes()[:-90])  # killed mid-write: the step-10 val loss is cut
    (tmp_path / "killed" / "checkpoints").mkdir(parents=True)  # a kill -9 before the first event
    (tmp_path / "killed" / "config.yaml").write_text("train: {seed: 6, max_it")
    (tmp_path / "killed" / PID_NAME).write_text("999999999\n")  # a note left by a dead process
    result = compare(CompareConfig(paths=[str(tmp_path)]))
    status = {row["run"]: row["status"] for row in result.run_rows}
    assert status == {"done1": "finished", "done2": "finished", "crashed": "crashed", "running": "running",
                      "cut": "crashed", "killed": "crashed", "no_final": "crashed"}
    assert {row["run"]: row["best_val_loss"] for row in result.run_rows}["cut"] == pytest.approx(2.5)
    group = next(row for row in result.group_rows if row["group"] == "all")
    assert group["n"] == 2 and group["runs"] == 6  # finished runs only; the unreadable config is its own group
    assert group["final_val_loss_mean"] == pytest.approx(2.1)
    assert "| killed | crashed |" in result.markdown and "2 of 6" in result.markdown
    lines = result.markdown.splitlines()
    column = [cell.strip() for cell in lines[2].split("|")].index("peak memory")
    cells = [cell.strip() for cell in next(line for line in lines if line.startswith("| crashed |")).split("|")]
    assert cells[column] == "—"  # never measured: unknown, not 0


def test_files_are_written_and_the_plot_means_each_group(tmp_path):
    for i, loss in enumerate((2.0, 2.2)):
        fake_run(tmp_path / "runs" / f"r{i}", loss, seed=i)
    result = run_comparison(CompareConfig(paths=[str(tmp_path / "runs")], target=2.2, out=str(tmp_path / "out")),
                            stream=None)
    out = tmp_path / "out"
    assert (out / "comparison.md").read_text() == result.markdown
    assert (out / "comparison.csv").read_text().splitlines()[0].endswith("time_to_target_s")
    assert (out / "comparison.png").read_bytes().startswith(b"\x89PNG")
    r0 = tmp_path / "runs" / "r0"
    acc = EventAccumulator(str(r0))
    acc.Reload()
    reached = next(t for _, v, t in logged(r0, TAG_VAL_LOSS) if v <= 2.2) - acc.FirstEventTimestamp()
    assert result.run_rows[0]["time_to_target_s"] == pytest.approx(reached)  # step 10's loss, 2.0, is the first
    assert result.run_rows[0]["peak_memory_bytes"] == 42 << 20  # from the HPARAMS metrics
    curves = [r.series(TAG_VAL_LOSS) for r in result.runs]
    steps, loss, elapsed = mean_curve(curves)
    assert steps == [5, 10] and loss == pytest.approx([2.5, 2.0])
    assert elapsed == pytest.approx([np.mean([c.elapsed[i] for c in curves]) for i in range(2)])


def test_best_loss_and_time_to_target_read_the_whole_curve(tmp_path):
    run = read_run(fake_run(tmp_path / "r", 2.2, seed=1, steps=15, val=[2.4, 2.1, 2.3]))
    assert run.best_val_loss == pytest.approx(2.1)  # not the last one
    val = run.series(TAG_VAL_LOSS)
    assert run.time_to(2.2) == val.elapsed[1] and run.time_to(2.45) == val.elapsed[0] and run.time_to(2.0) is None
    assert val.elapsed == sorted(val.elapsed) and val.elapsed[0] >= 0


def test_the_mean_curve_stops_where_the_shortest_seed_stops():
    long, short = Series([5, 10], [2.0, 1.0], [1.0, 2.0]), Series([5], [3.0], [3.0])
    assert mean_curve([long, short]) == ([5], [2.5], [2.0])


def test_bare_paths_are_split_from_overrides(tmp_path):
    odd = tmp_path / "lr=0.1"
    odd.mkdir()
    assert split_paths(["runs/a", "runs/*", "target=2", str(odd), "--help"]) == (
        ["runs/a", "runs/*", str(odd)], ["target=2", "--help"])


@pytest.mark.slow
def test_the_documented_command_line(sweep, tmp_path):
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "gptmini.compare", str(sweep / "a"), str(sweep / "b"),
                             f"paths=[{sweep / 'c'}]", "target=3.5", "baseline=0.001"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("| finished |") == 3 and "p: Welch's t-test against train.lr=0.001" in result.stdout
    assert {p.name for p in tmp_path.iterdir()} == {"comparison.md", "comparison.csv", "comparison.png"}
    assert math.isfinite(float(result.stdout.split("| a | finished |")[1].split("|")[5]))
