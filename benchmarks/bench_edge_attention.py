"""Crysformer training cost: reference edge attention vs torch.compile vs the fused op.

Providers (same model, same weights, same batch, side by side in one run):

* ``reference``: the naive per-layer path (``edge_impl = "naive"``: per-edge features,
  LayerNorm and Linear materialised in every layer), eager;
* ``reference+compile``: the same under ``torch.compile`` (inductor, static shapes);
* ``factorized``: the earlier pure-PyTorch fast path (informational);
* ``fused``: the fused op (``edge_impl = "fused"``; C++ kernels on CPU, Triton on GPU);
* ``fused-dense``: the fused op with its ``dense`` backend (batched matrix products over
  crystals padded to the largest; cuBLAS on a GPU);
* ``fused-dense+compile``: the fused-dense model under ``torch.compile`` (the op stays
  opaque; inductor fuses the rest of each layer);
* ``...+cuda_graph`` (GPU only): the whole training step captured once in a CUDA graph
  for the fixed batch and replayed, which removes every host-side cost. ``dao train``
  does not capture (its batches change layout): these rows show how much of a step is
  launch overhead, not the speed of ``dao train``.

Models: the shipped size (4 layers, 128, 4 heads, K = 32) and the paper size (12,
384, 8, 128). Batches: real crystals, the first B of ``mp_20_pilot/val`` (<= 20
atoms) and of ``mpts_52/val`` (<= 52 atoms) from ../shared/data: 64 / 16 crystals
(shipped / paper size) for MP-20 and 16 / 4 for MPTS-52 on CPU; on a GPU 256 and 64
(``GPU_CRYSTALS``: smaller batches would time kernel launches; ``--crystals`` overrides).
On a GPU the ``reference+compile`` provider compiles for minutes per row: leave it out
with ``--providers reference factorized fused`` where time is short. Measured per
provider: forward (the DAO-G loss, with autograd recording), backward, a full
training step (forward + backward + Adam, the fused Adam that ``dao train`` uses), and
the peak heap growth during one training step (CPU: glibc ``mallinfo2`` sampled every
0.2 ms from a watcher thread; GPU: ``torch.cuda.max_memory_allocated`` above the
allocation before the step).
Times are medians of ``--repeats`` runs after a warm-up step.

Run (rows go to benchmarks/results/edge_attention.csv)::

    python benchmarks/bench_edge_attention.py [--threads 2] [--repeats 5] [--quick]

``--compare-kernels`` instead times the two C++ kernels of the fused op side by side
(``DAO_EDGE_ATTENTION_KERNEL`` = ``pairs`` | ``gemm``, switched between calls in one
process, repeats interleaved, medians): the core op forward and backward on the
real MP-20 batch (random node tensors of the model's shapes) and a full training
step of the model (Adam at learning rate 0, so every repeat sees the same weights),
for each thread count of ``--threads`` (rows go to results/edge_attention_kernels.csv)::

    python benchmarks/bench_edge_attention.py --compare-kernels --threads 1 2 [--repeats 9]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402

from dao._graph import static_batch  # noqa: E402
from dao.train import make_optimizer  # noqa: E402  (the optimizer training uses)

DATA = _harness.REPO_ROOT.parent / "shared" / "data"
SIZES = {
    "shipped": dict(num_layers=4, hidden=128, heads=4, num_freqs=32),
    "paper": dict(num_layers=12, hidden=384, heads=8, num_freqs=128),
}
# (CSV, crystals per batch for the shipped size, for the paper size)
WORKLOADS = {
    "mp20": ("mp_20_pilot/val.csv.gz", 64, 16),
    "mpts52": ("mpts_52/val.csv.gz", 16, 4),
}
# On a GPU the CPU batches would only measure kernel-launch overhead: batches the size
# of a training batch per GPU instead (the paper trains with 1,024 over 3 GPUs).
GPU_CRYSTALS = {"mp20": (256, 256), "mpts52": (64, 64)}
PROVIDERS = (
    "reference",
    "reference+compile",
    "factorized",
    "fused",
    "fused-dense",
    "fused-dense+compile",
    "reference+cuda_graph",
    "factorized+cuda_graph",
    "fused+cuda_graph",
    "fused-dense+cuda_graph",
)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _heap_in_use() -> int:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    m = libc.mallinfo2()
    return int(m.uordblks + m.hblkhd)


def peak_heap_growth(fn, period: float = 2e-4) -> int:
    """Bytes: the highest heap use seen while ``fn()`` runs, minus the use before."""
    base = _heap_in_use()
    peak = [base]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], _heap_in_use())
            time.sleep(period)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    try:
        fn()
    finally:
        stop.set()
        th.join()
    return max(peak[0], _heap_in_use()) - base


def load_batch(csv_name: str, n: int):
    from dao.data.crystal import CrystalBatch  # noqa: PLC0415
    from dao.data.csv import load_csv  # noqa: PLC0415

    data = load_csv(DATA / csv_name, progress=False)
    counts = data.num_atoms[:n]
    atoms = int(counts.sum())
    return CrystalBatch(
        torch.as_tensor(data.atom_types[:atoms], dtype=torch.int64),
        torch.as_tensor(data.frac_coords[:atoms], dtype=torch.float32),
        torch.as_tensor(data.lattice[:n], dtype=torch.float32),
        torch.as_tensor(counts, dtype=torch.int64),
    )


def make_diffusion(size: str, provider: str, device: str = "cpu"):
    from dao.pretrained import build_diffusion  # noqa: PLC0415

    torch.manual_seed(0)
    diff = build_diffusion({"model": {"model": "crysformer", **SIZES[size]}}).to(device)
    if _harness.set_provider(diff.model, provider) == "compile":
        diff.model = torch.compile(diff.model, dynamic=False)
    return diff


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_cuda_growth(fn) -> int:
    """Bytes: peak CUDA allocation during ``fn()`` minus the allocation before."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def measure_captured(diff, batch, repeats: int) -> dict:
    """A whole training step (forward, backward, Adam) captured once in a CUDA graph
    for this fixed batch, then replayed: the step without any host-side cost.

    What a static-shape training loop could run; ``dao train`` feeds batches of varying
    layout and does not capture, so these rows bound what launch overhead costs and are
    not the speed of ``dao train``."""
    opt = torch.optim.Adam(diff.parameters(), lr=1e-4, fused=True, capturable=True)
    gen = torch.Generator(device="cuda").manual_seed(0)

    def step():
        loss = diff.loss(batch, gen)["loss"]
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    with static_batch():  # layout memo filled in the warm-up, read during the capture
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                opt.zero_grad(set_to_none=True)
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(gen)
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.cuda.graph(graph):
            step()
    torch.cuda.synchronize()
    # what the step allocates lives in the graph's pool, allocated during the capture
    mem = torch.cuda.max_memory_allocated() - base
    warm = time.perf_counter() - t0
    full = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        full.append(time.perf_counter() - t0)
    nan = float("nan")
    return {
        "forward_ms": nan,
        "backward_ms": nan,
        "train_step_ms": 1e3 * statistics.median(full[1:]),
        "peak_mem_mb": mem / 1e6,
        "warmup_s": warm,
    }


def measure(size: str, wl: str, provider: str, batch, repeats: int, device: str = "cpu") -> dict:
    diff = make_diffusion(size, provider, device)
    batch = batch.to(device)
    if provider.endswith("+cuda_graph"):
        if device != "cuda":
            raise ValueError(f"provider {provider} needs --device cuda")
        return measure_captured(diff, batch, repeats)
    opt = make_optimizer(diff.parameters(), "adam", lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)

    def forward():
        gen.manual_seed(0)
        return diff.loss(batch, gen)["loss"]

    def step():
        with static_batch():  # as dao train: one layout per forward + backward
            loss = forward()
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()  # warm-up (and compilation)
    _sync(device)
    warm = time.perf_counter() - t0
    fwd, bwd, full = [], [], []
    for _ in range(repeats):
        with static_batch():
            t0 = time.perf_counter()
            loss = forward()
            _sync(device)
            t1 = time.perf_counter()
            loss.backward()
            _sync(device)
            t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
        t0 = time.perf_counter()
        step()
        _sync(device)
        full.append(time.perf_counter() - t0)
    mem = peak_cuda_growth(step) if device == "cuda" else peak_heap_growth(step)
    return {
        "forward_ms": 1e3 * statistics.median(fwd),
        "backward_ms": 1e3 * statistics.median(bwd),
        "train_step_ms": 1e3 * statistics.median(full),
        "peak_mem_mb": mem / 1e6,
        "warmup_s": warm,
    }


CPP_KERNELS = ("pairs", "gemm")
KERNEL_ENV = "DAO_EDGE_ATTENTION_KERNEL"


def compare_kernels(size: str, batch, repeats: int, n_threads: int) -> list[dict]:
    """Rows (one per C++ kernel): median core forward, core backward and training
    step in ms, measured side by side (same batch, same weights, interleaved)."""
    from dao._graph import lattice_gram  # noqa: PLC0415
    from dao.ops.edge_attention import _core_backward_op, _core_op, _crystal_ptr  # noqa: PLC0415

    cfg = SIZES[size]
    heads, num_freqs = cfg["heads"], cfg["num_freqs"]
    d, dim = cfg["hidden"] // heads, 6 * num_freqs + 9
    n, n_cryst = int(batch.num_atoms.sum()), len(batch.num_atoms)
    index = torch.repeat_interleave(torch.arange(n_cryst), batch.num_atoms)
    ptr = _crystal_ptr(index, n_cryst)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(n, heads, d, generator=g) / d**0.5
    k, v = (torch.randn(n, heads, d, generator=g) for _ in range(2))
    u = 0.1 * torch.randn(n, heads, dim, generator=g)
    grad_o, grad_y = torch.randn(n, heads, d, generator=g), torch.randn(n, heads, dim, generator=g)
    frac, gram = batch.frac_coords, lattice_gram(batch.lattice).reshape(-1, 9)
    core = (q, k, v, u, frac, gram, index, ptr, num_freqs, 1e-5, "cpp")
    o, _, lse = _core_op(*core)
    diff = make_diffusion(size, "fused")
    opt = make_optimizer(diff.parameters(), "adam", lr=0.0)
    gen = torch.Generator().manual_seed(0)

    def step():
        gen.manual_seed(0)
        diff.loss(batch, gen)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    calls = {
        "core_forward_ms": lambda: _core_op(*core),
        "core_backward_ms": lambda: _core_backward_op(
            grad_o, grad_y, q, k, v, u, frac, gram, index, ptr, o, lse, num_freqs, 1e-5, "cpp"
        ),
        "train_step_ms": step,
    }
    times = {(kern, what): [] for kern in CPP_KERNELS for what in calls}
    with _harness.threads(n_threads):
        for r in range(repeats + 1):  # the first round is a warm-up
            for kern in CPP_KERNELS if r % 2 else CPP_KERNELS[::-1]:
                with _harness.env(KERNEL_ENV, kern):
                    for what, fn in calls.items():
                        t0 = time.perf_counter()
                        fn()
                        if r:
                            times[(kern, what)].append(1e3 * (time.perf_counter() - t0))
    return [
        {
            "kernel": kern,
            **{what: round(statistics.median(times[(kern, what)]), 3) for what in calls},
        }
        for kern in CPP_KERNELS
    ]


def main_compare(args) -> None:
    rows = []
    device_name = _harness.cpu_model()
    csv_name, n_shipped, n_paper = WORKLOADS["mp20"]
    for size in ["shipped"] if args.quick else list(SIZES):
        batch = load_batch(csv_name, n_shipped if size == "shipped" else n_paper)
        for nt in args.threads:
            for res in compare_kernels(size, batch, args.repeats, nt):
                row = {
                    "model": size,
                    "workload": "mp20",
                    "crystals": len(batch.num_atoms),
                    "atoms": int(batch.num_atoms.sum()),
                    "edges": int((batch.num_atoms**2).sum()),
                    **res,
                    **_harness.row_facts(nt, device_name),
                }
                rows.append(row)
                print({k: row[k] for k in ("model", "threads", "kernel", "core_forward_ms",
                                           "core_backward_ms", "train_step_ms",
                                           "load_avg_1min")}, flush=True)  # fmt: skip
    _harness.write_rows_csv(rows, args.out)


def batch_crystals(wl: str, size: str, args) -> int:
    """Crystals per batch: ``--crystals``, else the device's default for the workload."""
    if args.crystals:
        return args.crystals
    _, n_shipped, n_paper = WORKLOADS[wl]
    if args.device == "cuda":
        n_shipped, n_paper = GPU_CRYSTALS[wl]
    return n_shipped if size == "shipped" else n_paper


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[_harness.DEFAULT_THREADS])
    p.add_argument(
        "--compare-kernels", action="store_true", help="pairs vs gemm C++ kernel, side by side"
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="shipped size, MP-20 only, 2 repeats")
    p.add_argument("--providers", nargs="*", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=None)
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=None)
    p.add_argument("--crystals", type=int, default=None, help="crystals per batch (all rows)")
    p.add_argument(
        "--update",
        action="store_true",
        help="replace only the measured (model, workload, provider) rows of --out, keep the rest",
    )
    p.add_argument("--out", default=None, help="CSV path (default under benchmarks/results)")
    args = p.parse_args(argv)
    if args.compare_kernels:
        if args.out is None:
            args.out = str(_harness.REPO_ROOT / "benchmarks/results/edge_attention_kernels.csv")
        main_compare(args)
        return
    if args.out is None:
        args.out = str(_harness.REPO_ROOT / "benchmarks/results/edge_attention.csv")
    if len(args.threads) != 1:
        p.error("--threads takes one count (several only with --compare-kernels)")
    args.threads = args.threads[0]
    torch.set_num_threads(args.threads)
    sizes = ["shipped"] if args.quick else (args.sizes or list(SIZES))
    wls = ["mp20"] if args.quick else (args.workloads or list(WORKLOADS))
    repeats = 2 if args.quick else args.repeats
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else _harness.cpu_model()
    rows = []
    try:
        for size in sizes:
            for wl in wls:
                batch = load_batch(WORKLOADS[wl][0], batch_crystals(wl, size, args))
                edges = int((batch.num_atoms**2).sum())
                for provider in args.providers:
                    res = _harness.attempt(
                        measure,
                        size,
                        wl,
                        provider,
                        batch,
                        repeats,
                        args.device,
                        label=f"{size} {wl} {provider}",
                        device=args.device,
                    )
                    if res is None:
                        continue
                    row = {
                        "model": size,
                        "workload": wl,
                        "crystals": len(batch.num_atoms),
                        "atoms": int(batch.num_atoms.sum()),
                        "edges": edges,
                        "provider": provider,
                        **{k: round(v, 3) for k, v in res.items()},
                        **_harness.row_facts(args.threads, device_name),
                    }
                    rows.append(row)
                    print({k: row[k] for k in ("model", "workload", "provider", "forward_ms",
                                               "backward_ms", "train_step_ms", "peak_mem_mb")},
                          flush=True)  # fmt: skip
    except KeyboardInterrupt:  # stopped at a time limit: keep the rows measured so far
        print(f"interrupted: writing the {len(rows)} rows measured so far", flush=True)
    if not rows:
        sys.exit("no rows measured")
    if args.update and Path(args.out).exists():
        import csv  # noqa: PLC0415

        def key(r):
            return (r["model"], r["workload"], r["provider"])

        new = {key({k: str(v) for k, v in r.items()}) for r in rows}
        with open(args.out, newline="") as f:
            kept = [r for r in csv.DictReader(f) if key(r) not in new]
        rows = kept + rows
    _harness.write_rows_csv(rows, args.out)


if __name__ == "__main__":
    main()
