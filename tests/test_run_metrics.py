"""What every run records for comparisons, as functions the training loop calls: peak memory, and the final
metrics in TensorBoard's HPARAMS tab."""

from __future__ import annotations

import platform

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from gptmini.device import peak_memory_bytes, reset_peak_memory
from gptmini.run_log import (
    HPARAM_FINAL_VAL_LOSS,
    HPARAM_PEAK_MEMORY,
    HPARAM_TOKENS_PER_S,
    HPARAM_WALL_TIME,
    TensorBoard,
    final_metrics,
    format_bytes,
)

MB = 1 << 20


def rss() -> int:
    """The resident set size now (Linux), read here independently of gptmini."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/self/status")
def test_cpu_peak_memory_covers_a_big_allocation():
    before = rss()
    big = torch.ones(50 * MB)  # 200 MB of float32, written, so resident
    grown = rss() - before
    assert grown > 180 * MB
    peak = peak_memory_bytes(torch.device("cpu"))
    assert peak >= rss() >= before + grown
    del big
    reset_peak_memory(torch.device("cpu"))
    after = peak_memory_bytes(torch.device("cpu"))
    if after >= peak:
        pytest.skip("this kernel does not allow resetting the peak (/proc/self/clear_refs)")
    assert after < peak - 150 * MB  # the freed tensor no longer counts


def test_peak_memory_is_unknown_where_no_peak_is_kept():
    assert peak_memory_bytes(torch.device("meta")) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU")
def test_gpu_peak_memory_is_the_peak_allocated():
    device = torch.device("cuda")
    reset_peak_memory(device)
    base = torch.cuda.memory_allocated(device)
    x = torch.empty(64 * MB, dtype=torch.uint8, device=device)
    del x
    assert peak_memory_bytes(device) >= base + 64 * MB


def test_final_metrics_go_into_the_hparams_tab(tmp_path):
    metrics = final_metrics(2.5, [10.0, 1000.0, 1200.0, 1100.0], started=100.0, peak_memory=3 * MB, now=160.0)
    assert metrics == {HPARAM_FINAL_VAL_LOSS: 2.5, HPARAM_WALL_TIME: 60.0, HPARAM_TOKENS_PER_S: 1050.0,
                       HPARAM_PEAK_MEMORY: 3.0 * MB}  # the median: the slow first interval does not drag it down
    assert final_metrics(None, [], 0.0, None, now=1.0) == {HPARAM_WALL_TIME: 1.0}  # unmeasured: left out
    tb = TensorBoard(tmp_path)
    tb.write_final_metrics({"train": {"lr": 0.1}, "model": {"attention": {"name": "mha"}}}, metrics)
    tb.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    for tag, value in metrics.items():
        assert acc.Scalars(tag)[-1].value == value
    content = acc.PluginTagToContent("hparams")["_hparams_/experiment"]
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content).experiment
    assert {m.name.tag for m in experiment.metric_infos} == set(metrics)
    assert {h.name for h in experiment.hparam_infos} == {"train.lr", "model.attention.name"}


def test_bytes_read_as_people_write_them():
    assert [format_bytes(n) for n in (None, 512, 1536, 3 * MB, 5 << 30)] == ["—", "512 B", "1.5 KiB", "3.0 MiB",
                                                                            "5.0 GiB"]
