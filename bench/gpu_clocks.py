"""The SM clock and clock-limit events, sampled with nvidia-smi while a timed region runs.

A sustained run can hold a GPU at lower clocks than a short one: on an H200 the LLaDA-8B batch-16
step ran at 1575 MHz under the power limit, while the 8192^3 matmul rate it is compared with ran
at 1980 MHz (bench/results/step-llada-8b-clocks-h200.log). bench.step records the clock next to
every timing, so that two runs, or a ceiling and a step of one run, can be compared.

    with ClockSampler(nvidia_smi_gpu(device)) as clocks:
        ...  # the timed work
    clocks.summary()  # {"sm_clock_mhz": median, "power_w": median, "clock_limited": share of samples, ...}
"""
from __future__ import annotations

import contextlib
import functools
import operator
import os
import select
import shutil
import signal
import statistics
import subprocess

import torch

QUERY = "clocks.sm,power.draw,clocks_event_reasons.active"
# Clock event reasons (nvidia-smi -q -d PERFORMANCE) that hold the clock down under load: software
# power cap, hardware slowdown, software and hardware thermal slowdown, hardware power brake.
LIMITING = 0x4 | 0x8 | 0x40 | 0x80 | 0x100
START_TIMEOUT_S = 5.0  # for nvidia-smi's first sample; without one nothing is sampled


def nvidia_smi_gpu(device: torch.device) -> str | None:
    """nvidia-smi's name for a CUDA device (its UUID, whatever CUDA_VISIBLE_DEVICES renumbers), or
    None off CUDA or without nvidia-smi."""
    if device.type != "cuda" or shutil.which("nvidia-smi") is None:
        return None
    return f"GPU-{torch.cuda.get_device_properties(device).uuid}"


def parse_samples(text: str) -> list[tuple[float, float, int]]:
    """(SM MHz, watts, clock event reasons) per line of `--format=csv,noheader,nounits` output;
    lines that are not samples ([N/A] fields, an error message) are skipped."""
    samples = []
    for line in text.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 3:
            continue
        try:
            samples.append((float(fields[0]), float(fields[1]), int(fields[2], 16)))
        except ValueError:
            continue
    return samples


def summarize(samples: list[tuple[float, float, int]]) -> dict:
    """The median SM clock and power draw, the share of samples a limit held down and which limits
    did (the event reasons' bits, or-ed: 0x4 software power cap, 0x8 hardware slowdown, ...)."""
    if not samples:
        return {"sm_clock_mhz": None, "power_w": None, "clock_limited": None, "clock_reasons": None,
                "clock_samples": 0}
    limits = [s[2] & LIMITING for s in samples]
    return {"sm_clock_mhz": statistics.median(s[0] for s in samples),
            "power_w": statistics.median(s[1] for s in samples),
            "clock_limited": sum(map(bool, limits)) / len(samples),
            "clock_reasons": hex(functools.reduce(operator.or_, limits)),
            "clock_samples": len(samples)}


class ClockSampler:
    """Samples `gpu` (an nvidia-smi device name; None: samples nothing) every interval_ms while the
    with-block runs. Sampling has started when the block begins: the first sample, taken before
    it, is not counted."""

    def __init__(self, gpu: str | None, interval_ms: int = 20):
        self.gpu, self.interval_ms = gpu, interval_ms
        self.process: subprocess.Popen | None = None
        self.samples: list[tuple[float, float, int]] = []

    def __enter__(self) -> "ClockSampler":
        if self.gpu is None:
            return self
        self.process = subprocess.Popen(
            ["nvidia-smi", "-i", self.gpu, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits",
             "-lms", str(self.interval_ms)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            start_new_session=True)  # its own process group, stopped whole
        started = select.select([self.process.stdout], [], [], START_TIMEOUT_S)[0]
        if not started or not parse_samples(self.process.stdout.readline()):  # an older driver, an unknown GPU
            self._stop()
        return self

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.samples = parse_samples(self._stop())

    def _stop(self) -> str:
        process, self.process = self.process, None
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            try:
                return process.communicate(timeout=5)[0]
            except subprocess.TimeoutExpired:
                continue
        return ""

    def summary(self) -> dict:
        return summarize(self.samples)
