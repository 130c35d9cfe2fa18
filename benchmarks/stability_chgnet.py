"""CHGNet stability proxy of DAO-G samples with and without energy guidance.

    python benchmarks/stability_chgnet.py ../shared/data/mp_20_pilot/test.csv.gz \
        --run unguided=unguided_pred.jsonl --run guided20=guided20_pred.jsonl \
        --subset 100 --seed 0 --out benchmarks/results/daop/stability_chgnet.json

Needs ``pip install chgnet`` (the ``eval`` extra). See :mod:`dao.eval.stability`.
"""

from __future__ import annotations

import argparse
import json

from dao.eval.stability import stability_proxy


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gt_csv")
    p.add_argument("--run", action="append", required=True, help="LABEL=predictions.jsonl")
    p.add_argument("--subset", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--fmax", type=float, default=0.1)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    runs = {}
    for item in args.run:
        label, _, path = item.partition("=")
        runs[label] = [path]
    rep = stability_proxy(
        args.gt_csv, runs, args.out, subset=args.subset, seed=args.seed,
        steps=args.steps, fmax=args.fmax,
    )  # fmt: skip
    print(json.dumps({k: v for k, v in rep.items() if k != "per_crystal"}, indent=1))


if __name__ == "__main__":
    main()
