"""Sample DAO-G predictions for a CSP test set (``dao sample-test``).

For every test crystal the composition and the atom count are given (the CSP
task), so each sample has exactly the ground truth's atoms. Predictions stream
to a JSONL file (one line per crystal and sample, the format ``dao evaluate``
reads); an interrupted run resumes, skipping crystals already written.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from dao._progress import show_progress

__all__ = ["sample_test_set", "add_sample_parser"]


def _drop_torn_tail(path: Path) -> None:
    """Cut a partial last line (left by a kill mid-write) so appends start clean."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _done_samples(path: Path) -> set[tuple[str, int]]:
    """(material_id, sample index) pairs already written to ``path``."""
    done = set()
    if path.exists():
        with path.open() as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    done.add((rec["material_id"], int(rec.get("sample", 0))))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue  # a torn last line from a kill: that sample is redone
    return done


def sample_test_set(
    gt_csv: str | os.PathLike,
    out: str | os.PathLike,
    *,
    weights: str | os.PathLike | None = None,
    num_samples: int = 1,
    subset: int | None = None,
    seed: int = 0,
    batch_size: int = 100,
    step_lr: float | None = None,
    device: str = "cpu",
    progress: bool = True,
    shard: tuple[int, int] | None = None,
    daop_weights: str | os.PathLike | None = None,
    guidance_scale: float = 0.0,
) -> dict:
    """Write ``num_samples`` DAO-G samples per test crystal to ``out`` (JSONL).

    ``shard = (k, n)`` keeps every n-th crystal of the (subset) list starting at k,
    so n processes with their own ``out`` files split one job; ``dao evaluate``
    reads several prediction files at once.

    Returns:
        {"crystals": sampled now, "seconds": wall time, "seconds_per_structure": ...}.
    """
    from dao.data.csv import read_csv_rows  # noqa: PLC0415
    from dao.eval.cli import subset_indices  # noqa: PLC0415
    from dao.generate import parse_formula  # noqa: PLC0415
    from dao.pretrained import load_daog  # noqa: PLC0415

    out = Path(out)
    _, rows = read_csv_rows(gt_csv)
    rows = list(rows)
    rows = [rows[i] for i in subset_indices(len(rows), subset, seed)]
    if shard is not None:
        k, n = shard
        if not (n >= 1 and 0 <= k < n):
            raise ValueError(f"shard must be (k, n) with 0 <= k < n, got {shard}")
        rows = rows[k::n]
    _drop_torn_tail(out)
    done = _done_samples(out)
    todo = [r for r in rows if any((r["material_id"], k) not in done for k in range(num_samples))]
    diffusion, _ = load_daog(weights, device)
    from dao.eval.baseline import parse_cif  # noqa: PLC0415

    jobs = []  # (material_id, sample, atomic numbers)
    for r in todo:
        s = parse_cif(r["cif"])
        parse_formula(s.composition.reduced_formula)  # clear error for unusable elements
        z = sorted(site.specie.Z for site in s)
        jobs.extend(
            (r["material_id"], k, z)
            for k in range(num_samples)
            if (r["material_id"], k) not in done
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    kwargs = {} if step_lr is None else {"step_lr": step_lr}
    daop = None
    if guidance_scale != 0.0:
        from dao.pretrained import load_daop  # noqa: PLC0415

        daop, _ = load_daop(daop_weights, device)
        kwargs["guidance_scale"] = float(guidance_scale)
    for b0 in range(0, len(jobs), batch_size):
        chunk = jobs[b0 : b0 + batch_size]
        types = torch.tensor([z for _, _, zs in chunk for z in zs], device=device)
        nums = torch.tensor([len(zs) for _, _, zs in chunk], device=device)
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + b0)
        if daop is not None:
            kwargs["energy_guidance"] = daop.guidance(types)
        with torch.no_grad():
            res = diffusion.sample(
                types, nums, generator=gen, progress=progress, cuda_graph="auto", **kwargs
            )
        ptr = [0, *torch.cumsum(nums, 0).tolist()]
        with out.open("a") as f:
            for k, (mid, sample, _) in enumerate(chunk):
                rec = {
                    "material_id": mid,
                    "sample": sample,
                    "atom_types": res.atom_types[ptr[k] : ptr[k + 1]].tolist(),
                    "frac_coords": (res.frac_coords[ptr[k] : ptr[k + 1]] % 1.0).tolist(),
                    "lattice": res.lattice[k].tolist(),
                }
                f.write(json.dumps(rec) + "\n")
    seconds = time.perf_counter() - start
    return {
        "crystals": len(todo),
        "structures": len(jobs),
        "seconds": seconds,
        "seconds_per_structure": seconds / max(1, len(jobs)),
    }


def add_sample_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sample-test",
        help="sample DAO-G predictions for a CSP test set (JSONL for dao evaluate)",
    )
    p.add_argument("gt_csv", help="test CSV (CDVAE format), e.g. mp_20_pilot/test.csv.gz")
    p.add_argument("--out", required=True, help="predictions JSONL (resumed if it exists)")
    p.add_argument("--weights", default=None, help="DAO-G weights or checkpoint (default: shipped)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--subset", type=int, default=None, help="N random test crystals")
    p.add_argument("--seed", type=int, default=0, help="seed of --subset and of sampling")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--step-lr", type=float, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--shard",
        default=None,
        metavar="K/N",
        help="sample only crystals K, K+N, K+2N, ... of the list (N processes, N files)",
    )
    p.add_argument(
        "--guidance-scale",
        type=float,
        default=0.0,
        help="energy guidance from DAO-P with this scale (the paper uses 20); 0 = off",
    )
    p.add_argument("--daop-weights", default=None, help="DAO-P weights (default: shipped)")
    p.add_argument("-q", "--quiet", action="store_true")

    def run(args) -> int:
        shard = None
        if args.shard:
            try:
                k, n = (int(x) for x in args.shard.split("/"))
            except ValueError:
                msg = f"--shard must look like K/N, e.g. 0/2; got {args.shard!r}"
                raise SystemExit(msg) from None
            shard = (k, n)
        info = sample_test_set(
            args.gt_csv,
            args.out,
            weights=args.weights,
            num_samples=args.num_samples,
            subset=args.subset,
            seed=args.seed,
            batch_size=args.batch_size,
            step_lr=args.step_lr,
            device=args.device,
            progress=show_progress(not args.quiet),
            shard=shard,
            daop_weights=args.daop_weights,
            guidance_scale=args.guidance_scale,
        )
        print(json.dumps(info))
        return 0

    p.set_defaults(func=run)
