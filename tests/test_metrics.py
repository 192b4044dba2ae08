"""TensorBoard logger (rank 0 only), throughput meter, memory report, progress line."""

from __future__ import annotations

import io
import re

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gbcosface.distributed import DistContext
from gbcosface.metrics import NullLogger, Throughput, make_logger, memory_stats
from gbcosface.progress import Progress, format_duration


def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_rank0_writes_scalars_that_read_back(tmp_path):
    logger = make_logger(DistContext(rank=0, world_size=2), tmp_path / "tb")
    logger.scalar("train/loss", 2.5, 10)
    logger.scalar("train/loss", torch.tensor(1.25), 20)
    logger.scalars({"train/boundary": 0.6, "train/lr": torch.tensor(0.1, dtype=torch.float64)}, 20)
    logger.flush()
    logger.close()
    got = read_scalars(tmp_path / "tb")
    assert set(got) == {"train/loss", "train/boundary", "train/lr"}
    assert got["train/loss"] == [(10, 2.5), (20, 1.25)]
    assert got["train/boundary"][0][0] == 20 and got["train/boundary"][0][1] == pytest.approx(0.6)
    assert got["train/lr"][0][1] == pytest.approx(0.1)
    # one event file, no per-tag sub-folders
    assert [p.parent for p in (tmp_path / "tb").rglob("events.*")] == [tmp_path / "tb"]


def test_other_ranks_write_nothing(tmp_path):
    logger = make_logger(DistContext(rank=1, world_size=2), tmp_path / "tb")
    assert isinstance(logger, NullLogger)
    logger.scalar("train/loss", 1.0, 1)
    logger.scalars({"a": 1.0}, 1)
    logger.flush()
    logger.close()
    assert list(tmp_path.iterdir()) == []


def test_no_log_dir_means_no_logging(tmp_path):
    assert isinstance(make_logger(DistContext(), None), NullLogger)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_throughput_over_a_window():
    clock = FakeClock()
    meter = Throughput(window=3, clock=clock)
    assert meter.rate() == 0.0
    meter.start()
    # slow start (1 s per 64 items), then fast (0.25 s per 64 items)
    for dt in (1.0, 1.0, 0.25, 0.25, 0.25):
        clock.now += dt
        meter.update(64)
    # only the last three intervals count: 3 * 64 items in 0.75 s
    assert meter.rate() == pytest.approx(3 * 64 / 0.75)
    clock.now += 10.0  # a pause (evaluation), then a restart of the window
    meter.start()
    clock.now += 0.5
    meter.update(32)
    assert meter.rate() == pytest.approx(32 / 0.5)


def test_throughput_first_update_starts_the_clock():
    clock = FakeClock()
    meter = Throughput(window=5, clock=clock)
    meter.update(10)
    assert meter.rate() == 0.0  # no interval finished yet
    clock.now = 2.0
    meter.update(10)
    assert meter.rate() == pytest.approx(10 / 2.0)


def test_memory_reports_peak_rss_on_cpu():
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    stats = memory_stats(torch.device("cpu"))
    assert set(stats) == {"memory/max_rss_gib"}
    assert stats["memory/max_rss_gib"] >= big.numel() * 4 / 2**30
    assert stats["memory/max_rss_gib"] < 1024  # GiB, not KiB or bytes


def test_progress_prints_every_interval_with_rate_and_eta():
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(100, desc="train", every_s=5.0, stream=out, clock=clock)
    for _ in range(100):
        clock.now += 0.5
        progress.update(1, loss=0.5)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10  # one per 5 s of 50 s, the last on completion
    first = lines[0]
    assert first.startswith("train | 10/100 (10.0%)")
    assert "loss 0.5" in first
    assert "2.0 it/s" in first
    assert f"ETA {format_duration(90 / 2.0)}" in first
    assert lines[-1].startswith("train | 100/100 (100.0%)")


def test_progress_every_n_items_and_unknown_total():
    out = io.StringIO()
    progress = Progress(None, every_s=0, every_n=3, stream=out, clock=FakeClock())
    for _ in range(10):
        progress.update()
    counts = [int(re.match(r"(\d+) \|", line).group(1)) for line in out.getvalue().splitlines()]
    assert counts == [3, 6, 9]
    assert "ETA" not in out.getvalue()


def test_disabled_progress_prints_nothing_but_counts():
    out = io.StringIO()
    progress = Progress(5, enabled=False, every_n=1, stream=out)
    for _ in range(5):
        progress.update()
    assert out.getvalue() == "" and progress.count == 5


def test_format_duration():
    assert format_duration(0) == "0:00:00"
    assert format_duration(3 * 3600 + 4 * 60 + 5.4) == "3:04:05"
    assert format_duration(-3) == "0:00:00"
