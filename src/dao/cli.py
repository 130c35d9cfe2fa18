"""The ``dao`` command line."""

from __future__ import annotations

import argparse
import sys

from dao._progress import show_progress
from dao.daop.cli import add_daop_parsers
from dao.data.download import add_download_parser
from dao.eval.cli import add_compare_parser, add_evaluate_parser
from dao.eval.sample import add_sample_parser

__all__ = ["main"]


def _cmd_info(_args: argparse.Namespace) -> int:
    import platform  # noqa: PLC0415

    import torch  # noqa: PLC0415

    import dao  # noqa: PLC0415

    print(f"dao-csp {dao.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    print(f"compiled CUDA kernels: {'yes' if dao.has_cuda_ext() else 'no'}")
    print(f"triton kernels usable: {'yes' if dao.has_triton() else 'no'}")
    print(f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from dao.generate import generate, write_outputs  # noqa: PLC0415

    z = args.formula_units if args.formula_units == "auto" else int(args.formula_units)
    try:
        results = generate(
            args.formula,
            args.num_samples,
            formula_units=z,
            seed=args.seed,
            weights=args.weights,
            step_lr=args.step_lr,
            device=args.device,
            max_atoms=args.max_atoms,
            progress=show_progress(not args.quiet),
            daop=_daop_choice(args),
            guidance_scale=_guidance_scale(args),
            rank_by_energy=args.rank_by_energy,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"dao generate: error: {exc}", file=sys.stderr)
        return 2
    out = args.out or f"dao_{results[0].formula}"
    csv_path = write_outputs(results, out, pictures=args.png)
    _print_table([r.summary() for r in results])
    print(f"wrote {len(results)} CIF files and {csv_path}")
    return 0


def _guidance_scale(args: argparse.Namespace) -> float:
    from dao.diffusion import DEFAULT_GUIDANCE_SCALE  # noqa: PLC0415

    if args.guidance_scale is not None:
        return float(args.guidance_scale)
    return DEFAULT_GUIDANCE_SCALE if args.guidance else 0.0


def _daop_choice(args: argparse.Namespace):
    """DAO-P weights when energy is asked for (guidance, ranking, or --daop-weights)."""
    wanted = args.guidance or args.guidance_scale or args.rank_by_energy or args.daop_weights
    if not wanted:
        return None
    return args.daop_weights or True


def _print_table(rows: list[dict]) -> None:
    cols = [
        "formula",
        "Z",
        "spacegroup",
        "a",
        "b",
        "c",
        "alpha",
        "beta",
        "gamma",
        "volume",
        "valid",
        "residual",
    ]
    if rows and "energy" in rows[0]:
        cols.append("energy")
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("rank  " + "  ".join(c.rjust(widths[c]) for c in cols))
    for k, r in enumerate(rows, 1):
        print(f"{k:>4}  " + "  ".join(str(r[c]).rjust(widths[c]) for c in cols))


def _cmd_train(args: argparse.Namespace) -> int:
    from dao.train.run import load_run_config, train_from_config  # noqa: PLC0415

    cfg = load_run_config(args.config)
    if args.max_minutes is not None:
        cfg.setdefault("train", {})["max_minutes"] = args.max_minutes
    if args.init_from:
        cfg.setdefault("train", {})["init_from"] = args.init_from
    out = args.out or f"runs/{__import__('pathlib').Path(args.config).stem}"
    summary = train_from_config(
        cfg, out, resume=not args.restart, progress=show_progress(not args.quiet)
    )
    print(
        f"{'finished' if summary['finished'] else 'stopped'} at step {summary['step']} "
        f"(epoch {summary['epoch']}), {summary['elapsed_s'] / 60:.1f} min of training; "
        f"best validation loss {summary['best_val']:.4f}"
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from dao.train.run import export_checkpoint  # noqa: PLC0415

    path = export_checkpoint(args.checkpoint, args.out, use_ema=not args.no_ema)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dao", description="Crystal structure prediction with the DAO foundation models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_download_parser(sub)
    add_evaluate_parser(sub)
    add_compare_parser(sub)
    add_sample_parser(sub)
    add_daop_parsers(sub)
    p = sub.add_parser("info", help="versions and available kernels")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "generate",
        help="generate crystal structures for a composition (DAO-G)",
        description="Generate crystal structures for FORMULA with DAO-G and write CIF files "
        "plus summary.csv, best first.",
    )
    p.add_argument("formula", help="chemical formula, e.g. CsV3Sb5")
    p.add_argument("-n", "--num-samples", type=int, default=5, help="structures to keep (5)")
    p.add_argument(
        "-z",
        "--formula-units",
        default="auto",
        help="formula units per cell, or 'auto' to try several and keep the best (auto)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default=None, help="DAO-G weights (default: shipped model)")
    p.add_argument("--step-lr", type=float, default=None, help="corrector step size")
    p.add_argument("--max-atoms", type=int, default=None, help="override the model's cell limit")
    p.add_argument("--device", default="cpu")
    p.add_argument("-o", "--out", default=None, help="output folder (dao_<formula>)")
    p.add_argument("--png", action="store_true", help="also draw each structure as PNG")
    p.add_argument(
        "--guidance",
        action="store_true",
        help="energy guidance from DAO-P while sampling (scale 20, the paper's)",
    )
    p.add_argument(
        "--guidance-scale", type=float, default=None, help="energy guidance with this scale w"
    )
    p.add_argument(
        "--rank-by-energy",
        action="store_true",
        help="rank the samples by DAO-P's energy above hull (lowest first)",
    )
    p.add_argument("--daop-weights", default=None, help="DAO-P weights (default: shipped)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "train",
        help="train DAO-G from a run config (resumes the run folder if it exists)",
        description="Train from a TOML run config. Running the same command again resumes "
        "from the last checkpoint of the run folder.",
    )
    p.add_argument("config", help="run config (TOML), e.g. configs/daog_mp20_small.toml")
    p.add_argument("-o", "--out", default=None, help="run folder (runs/<config name>)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this wall time")
    p.add_argument("--init-from", default=None, help="start a new stage from this checkpoint")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("export", help="export a checkpoint's EMA weights as safetensors")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead")
    p.set_defaults(func=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
