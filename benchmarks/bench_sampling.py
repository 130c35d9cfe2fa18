"""DAO-G sampling throughput: reference vs fused, structures per second.

Providers (same weights, same compositions, same generator, side by side in one run):

* ``reference``: naive edge attention (``edge_impl = "naive"``) and the pure-PyTorch
  twins of the diffusion steps (``step_backend = "torch"``);
* ``factorized``: the earlier pure-PyTorch fast attention, fused steps (informational);
* ``fused``: the fused edge-attention op and the fused steps (the defaults);
* ``fused-dense``: the fused op with its ``dense`` backend (batched matrix products over
  padded crystals; on CPU the default is the C++ kernel, on GPU the Triton kernel);
* ``fused+cuda_graph``, ``fused-dense+cuda_graph``: the fused paths captured in a CUDA
  graph (GPU only);
* ``factorized+cuda_graph``: the factorized path captured in a CUDA graph (GPU only).

Models: the shipped weights (4 layers, 128, K = 32) and a randomly initialised
paper-size Crysformer (12, 384, 8 heads, K = 128; same cost as a trained one).
Compositions: the first B crystals of ``mp_20_pilot/test`` (<= 20 atoms) and of
``mpts_52/val`` (<= 52 atoms), from ../shared/data: B = 100 / 16 (shipped / paper
size) for MP-20 and 25 / 4 for MPTS-52 on CPU; on a GPU 1,000 / 256 and 256 / 64
(``GPU_CRYSTALS``; ``--crystals`` overrides).

A full sample is T = 1,000 predictor-corrector steps that all cost the same, so
each provider runs ``--steps`` of them (the first one untimed) and structures/s
= B / (T · seconds per step); the sampler is stopped through its callback.

Run (rows go to benchmarks/results/sampling.csv)::

    python benchmarks/bench_sampling.py [--threads 2] [--steps 12] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402

DATA = _harness.REPO_ROOT.parent / "shared" / "data"
PAPER = dict(num_layers=12, hidden=384, heads=8, num_freqs=128)
# (CSV, crystals for the shipped model, for the paper-size model)
WORKLOADS = {
    "mp20": ("mp_20_pilot/test.csv.gz", 100, 16),
    "mpts52": ("mpts_52/val.csv.gz", 25, 4),
}
GPU_CRYSTALS = {"mp20": (1000, 256), "mpts52": (256, 64)}
PROVIDERS = (
    "reference",
    "factorized",
    "fused",
    "fused-dense",
    "fused+cuda_graph",
    "fused-dense+cuda_graph",
    "factorized+cuda_graph",
)


class _Stop(Exception):
    pass


def compositions(csv_name: str, n: int):
    from dao.data.csv import load_csv  # noqa: PLC0415

    data = load_csv(DATA / csv_name, progress=False)
    counts = data.num_atoms[:n]
    types = torch.as_tensor(data.atom_types[: int(counts.sum())], dtype=torch.int64)
    return types, torch.as_tensor(counts, dtype=torch.int64)


def make_diffusion(model: str, device: str):
    from dao.pretrained import build_diffusion, load_daog  # noqa: PLC0415

    if model == "shipped":
        diff, _ = load_daog(device=device)
    else:
        torch.manual_seed(0)
        diff = build_diffusion({"model": {"model": "crysformer", **PAPER}}).to(device).eval()
    return diff


def seconds_per_step(diff, types, nums, provider: str, steps: int, device: str) -> float:
    graph = _harness.set_provider(diff.model, provider) == "cuda_graph"
    kwargs = {"step_backend": "torch"} if provider == "reference" else {}
    if graph:
        kwargs["cuda_graph"] = True
    stamps: list[float] = []

    def callback(_s, _state):
        if device == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        if len(stamps) == steps:
            raise _Stop

    gen = torch.Generator(device=device).manual_seed(0)
    try:
        diff.sample(types.to(device), nums.to(device), generator=gen, callback=callback, **kwargs)
    except _Stop:
        pass
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return statistics.median(gaps)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=_harness.DEFAULT_THREADS)
    p.add_argument("--steps", type=int, default=12, help="steps run per provider (>= 3)")
    p.add_argument("--quick", action="store_true", help="shipped model, MP-20 only, 4 steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--providers", nargs="*", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--models", nargs="+", choices=["shipped", "paper"], default=None)
    p.add_argument("--crystals", type=int, default=None, help="compositions per batch (all rows)")
    p.add_argument(
        "--fwd-heads",
        type=int,
        nargs="*",
        default=[],
        help="also run the fused providers with the Triton forward split into groups of "
        "this many heads ($DAO_TRITON_FWD_HEADS; rows 'fused (fwd heads N)')",
    )
    p.add_argument("--out", default=str(_harness.REPO_ROOT / "benchmarks/results/sampling.csv"))
    args = p.parse_args(argv)
    fwd_heads_env = None
    if args.fwd_heads:
        from dao.kernels.edge_attention import FWD_HEADS_ENV as fwd_heads_env  # noqa: PLC0415
    torch.set_num_threads(args.threads)
    steps = 4 if args.quick else max(3, args.steps)
    models = ["shipped"] if args.quick else (args.models or ["shipped", "paper"])
    wls = ["mp20"] if args.quick else list(WORKLOADS)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else _harness.cpu_model()
    rows = []
    try:
        for model in models:
            diff = make_diffusion(model, args.device)
            for wl in wls:
                csv_name, n_shipped, n_paper = WORKLOADS[wl]
                if args.device == "cuda":
                    n_shipped, n_paper = GPU_CRYSTALS[wl]
                n = args.crystals or (n_shipped if model == "shipped" else n_paper)
                types, nums = compositions(csv_name, n)
                variants = [(p, p, None) for p in args.providers] + [
                    (f"{p} (fwd heads {h})", p, h)
                    for h in args.fwd_heads
                    for p in args.providers
                    if p.partition("+")[0] == "fused"  # the split is Triton's
                ]
                for label, provider, heads in variants:
                    if provider.endswith("+cuda_graph") and args.device != "cuda":
                        continue
                    split = heads is not None
                    with _harness.env(fwd_heads_env, heads) if split else contextlib.nullcontext():
                        sec = _harness.attempt(
                            seconds_per_step,
                            diff,
                            types,
                            nums,
                            provider,
                            steps,
                            args.device,
                            label=f"{model} {wl} {label}",
                            device=args.device,
                        )
                    if sec is None:
                        continue
                    per_s = len(nums) / (diff.timesteps * sec)
                    row = {
                        "model": model,
                        "workload": wl,
                        "crystals": len(nums),
                        "atoms": int(nums.sum()),
                        "provider": label,
                        "ms_per_step": round(1e3 * sec, 3),
                        "structures_per_s": round(per_s, 5),
                        "s_per_structure": round(1.0 / per_s, 3),
                        "steps_timed": steps - 1,
                        **_harness.row_facts(args.threads, device_name),
                    }
                    rows.append(row)
                    print({k: row[k] for k in ("model", "workload", "provider", "ms_per_step",
                                               "structures_per_s")}, flush=True)  # fmt: skip
    except KeyboardInterrupt:  # stopped at a time limit: keep the rows measured so far
        print(f"interrupted: writing the {len(rows)} rows measured so far", flush=True)
    if not rows:
        sys.exit("no rows measured")
    _harness.write_rows_csv(rows, args.out)


if __name__ == "__main__":
    main()
