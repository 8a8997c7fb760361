"""Where a denoise step's GPU time goes: kernels of one configuration of bench.step, by total time.

    python -m bench.profile_step [--model llada-8b] [--batch 1] [--configs graph,fused_graph,compile] [--quick]

Builds the same random-weight model and step state as bench.step, runs each configuration's step
a few times under torch.profiler and prints the kernels that take the most GPU time, grouped by
name, with their share of the step. Compare the fused step with torch.compile kernel by kernel.

Kernels launch one after another here (difuse.fusion.launch.serial_launches): launched early, a
kernel's time would include its wait for the previous one.
"""
from __future__ import annotations

import argparse

import difuse.fusion  # noqa: F401  (selects the Triton interpreter on CPU-only hosts, before triton loads)
import torch
from torch.profiler import ProfilerActivity, profile

from bench.step import LABELS, Configuration, StepState
from bench.step_model import SPECS, TINY_OF, build_random_model
from difuse.fusion.launch import serial_launches


def kernel_table(prof, steps: int, top: int) -> str:
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time_total for e in events) or 1.0
    lines = [f"{'GPU us/step':>12} {'share':>6} {'calls/step':>10}  kernel"]
    for event in sorted(events, key=lambda e: -e.device_time_total)[:top]:
        lines.append(f"{event.device_time_total / steps:12.1f} {event.device_time_total / total:6.1%} "
                     f"{event.count / steps:10.1f}  {event.key[:110]}")
    lines.append(f"{total / steps:12.1f} {'100%':>6} {sum(e.count for e in events) / steps:10.1f}  all kernels")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SPECS), default="llada-8b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--configs", default="graph,fused_graph,compile")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=18)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU: no CUDA kernels to list)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    spec = TINY_OF[args.model] if args.quick else SPECS[args.model]
    prompt, gen, block = (16, 16, 8) if args.quick else (512, 256, 32)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode(), serial_launches():
        model = build_random_model(spec, device, dtype)
        state = StepState(model, args.batch, prompt, gen, block, spec.block_causal, device, dtype)
        for name in args.configs.split(","):
            config = Configuration(name, state, device)
            call = config.build()
            for _ in range(3):  # warm-up: recording, compilation, capture
                state.reset_block()
                call()
            if device.type == "cuda":
                torch.cuda.synchronize()
            with profile(activities=activities) as prof:
                for _ in range(args.steps):
                    state.reset_block()
                    call()
                if device.type == "cuda":
                    torch.cuda.synchronize()
            print(f"\n== {spec.name}, batch {args.batch}: {LABELS[name]}")
            print(kernel_table(prof, args.steps, args.top))
            call = None
            config.release()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
