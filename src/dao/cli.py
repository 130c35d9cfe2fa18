"""The ``dao`` command line."""

from __future__ import annotations

import argparse
import sys

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dao", description="Crystal structure prediction with the DAO foundation models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions and available kernels")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
