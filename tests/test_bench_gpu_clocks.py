"""bench.gpu_clocks: nvidia-smi samples parsed, summarised, and taken only while the timed calls run."""
import os
import stat
import textwrap
import time

import pytest
import torch

from bench.ceilings import time_calls
from bench.gpu_clocks import ClockSampler, nvidia_smi_gpu, parse_samples, summarize
from bench.step_output import clock


def test_samples_are_parsed_and_other_lines_skipped():
    text = "1980, 412.5, 0x0000000000000000\n[N/A], 80.1, 0x1\nFailed to query\n1755, 690.0, 0x0000000000000004\n"
    assert parse_samples(text) == [(1980.0, 412.5, 0), (1755.0, 690.0, 4)]


def test_summary_counts_the_samples_a_limit_held_down():
    samples = [(1980.0, 400.0, 0x0), (1700.0, 700.0, 0x4), (1650.0, 700.0, 0x80), (1980.0, 90.0, 0x1)]
    assert summarize(samples) == {"sm_clock_mhz": 1840.0, "power_w": 550.0, "clock_limited": 0.5,
                                  "clock_reasons": "0x84", "clock_samples": 4}  # the idle bit 0x1 is no limit
    assert summarize([]) == {"sm_clock_mhz": None, "power_w": None, "clock_limited": None, "clock_reasons": None,
                             "clock_samples": 0}


def test_clock_column():
    assert clock({"sm_clock_mhz": 1980.0, "clock_limited": 0.0}) == "1980"
    assert clock({"matmul_sm_clock_mhz": 1755.4, "matmul_clock_limited": 0.25}, "matmul_") == "1755*"
    assert clock({}) == "-"


def test_nothing_is_sampled_off_cuda():
    assert nvidia_smi_gpu(torch.device("cpu")) is None
    with ClockSampler(None) as clocks:
        pass
    assert clocks.summary()["clock_samples"] == 0


@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch):
    """An nvidia-smi that prints a warm-up sample, then samples until it is stopped, and records
    its arguments. Its first sample reads 1000 MHz, the timed ones 1500 MHz under a power cap."""
    script = tmp_path / "nvidia-smi"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "$@" > {tmp_path / "args"}
        echo "1000, 100.0, 0x1"
        while true; do echo "1500, 650.0, 0x4"; sleep 0.01; done
        """))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def test_sampler_counts_only_samples_taken_inside_the_block(fake_nvidia_smi):
    sampler = ClockSampler("GPU-1234", interval_ms=10)
    calls = []

    def work():
        calls.append(1)
        time.sleep(0.02)

    times = time_calls(work, torch.device("cpu"), warmup=2, iters=5, sampler=sampler)
    assert len(times) == 5 and len(calls) == 7
    summary = sampler.summary()
    assert summary["clock_samples"] >= 1
    assert summary["sm_clock_mhz"] == 1500.0 and summary["clock_limited"] == 1.0  # not the warm-up 1000 MHz
    assert summary["clock_reasons"] == "0x4" and summary["power_w"] == 650.0
    args = (fake_nvidia_smi / "args").read_text().split()
    assert args[:2] == ["-i", "GPU-1234"] and "-lms" in args
    assert sampler.process is None  # stopped


def test_a_gpu_nvidia_smi_cannot_query_gives_no_samples(tmp_path, monkeypatch):
    script = tmp_path / "nvidia-smi"
    script.write_text('#!/bin/sh\necho "Field \\"clocks_event_reasons.active\\" is not a valid field to query."\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with ClockSampler("GPU-1234") as clocks:
        pass
    assert clocks.summary()["clock_samples"] == 0


def test_an_nvidia_smi_that_prints_nothing_is_given_up_on(tmp_path, monkeypatch):
    script = tmp_path / "nvidia-smi"
    script.write_text("#!/bin/sh\nsleep 30\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr("bench.gpu_clocks.START_TIMEOUT_S", 0.2)
    begin = time.perf_counter()
    with ClockSampler("GPU-1234") as clocks:
        pass
    assert clocks.summary()["clock_samples"] == 0 and time.perf_counter() - begin < 5
