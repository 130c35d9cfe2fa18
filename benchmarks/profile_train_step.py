"""Where a training step's time goes, per provider: torch.profiler over a few steps.

Prints, for each (model size, workload, provider) of bench_edge_attention.py, the wall
time of a step, the GPU busy time (sum of kernel times) and the number of operator
calls, then the ten operators with the most GPU time. A step whose wall time is well
above its GPU busy time is bound by the host (Python, dispatch, kernel launches).

    python benchmarks/profile_train_step.py --sizes paper --workloads mpts52 \\
        --providers reference factorized fused-dense [--out profile.txt]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_edge_attention as bench  # noqa: E402

from dao._graph import static_batch  # noqa: E402
from dao.train import make_optimizer  # noqa: E402


def profile(size: str, wl: str, provider: str, device: str, steps: int) -> str:
    crystals = bench.GPU_CRYSTALS[wl] if device == "cuda" else bench.WORKLOADS[wl][1:]
    batch = bench.load_batch(bench.WORKLOADS[wl][0], crystals[size == "paper"]).to(device)
    diff = bench.make_diffusion(size, provider, device)
    opt = make_optimizer(diff.parameters(), "adam", lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)

    def step():
        with static_batch():
            diff.loss(batch, gen)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    top_level = sum(1 for e in prof.events() if e.cpu_parent is None) / steps
    # kernels only (operator rows repeat their kernels' time)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.device_time_total for e in kernels) / steps
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    head = (
        f"== {size} {wl} {provider}: step {1e3 * wall:.2f} ms wall (profiled), "
        f"GPU busy {gpu_us / 1e3:.2f} ms, {top_level:.0f} top-level operator calls per step"
    )
    return head + "\n" + events.table(sort_by=sort, row_limit=10, max_name_column_width=60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["paper"], choices=list(bench.SIZES))
    p.add_argument("--workloads", nargs="+", default=["mpts52"], choices=list(bench.WORKLOADS))
    p.add_argument("--providers", nargs="+", default=["reference", "factorized", "fused-dense"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=None, help="also append the report to this file")
    args = p.parse_args()
    for size in args.sizes:
        for wl in args.workloads:
            for provider in args.providers:
                text = profile(size, wl, provider, args.device, args.steps)
                print(text, flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(text + "\n")


if __name__ == "__main__":
    main()
