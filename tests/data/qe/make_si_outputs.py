"""Regenerate the captured pw.x outputs of this folder (Si, seconds each on 2 cores).

Run from the repository root with Quantum ESPRESSO installed:

    python tests/data/qe/make_si_outputs.py [--pseudo-src DIR]

Each run writes ``<name>.in`` and ``<name>.out.gz`` here: the input written by
``dao.eval.dft.pw_input`` and the untouched output of pw.x (gzipped).
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import tempfile
from pathlib import Path

from pymatgen.core import Lattice, Structure

from dao.eval.dft import QESettings, perturb_structure, run_pw

HERE = Path(__file__).resolve().parent
# Low cutoff and a 2x2x2 grid: not converged physics, just a quick real run.
SETTINGS = QESettings(ecutwfc=20.0, ecutrho=160.0, kpoints=(2, 2, 2))


def silicon(a: float = 5.43) -> Structure:
    """Diamond Si in pymatgen's primitive fcc cell (not QE's ibrav=2 orientation)."""
    conventional = Structure.from_spacegroup("Fd-3m", Lattice.cubic(a), ["Si"], [[0, 0, 0]])
    return conventional.get_primitive_structure()


RUNS = {
    # A cell 3 % too large: ibrav=2, cell_dofree='ibrav', converges in a few steps.
    # 5.61 Å is the equilibrium at these settings (the low cutoff's Pulay stress
    # expands it beyond the converged PBE value of about 5.47 Å).
    "si_vc_relax": dict(structure=silicon(5.61 * 1.03), calculation="vc-relax"),
    # Perturbed (ibrav=0, CELL_PARAMETERS angstrom), killed by the wall-time limit.
    "si_vc_relax_killed": dict(
        structure=perturb_structure(silicon(), seed=0),
        calculation="vc-relax",
        max_wall_s=12.0,
    ),
    # Fixed-cell relax stopped by nstep.
    "si_relax_nstep": dict(
        structure=perturb_structure(silicon(), seed=1),
        calculation="relax",
        settings=QESettings(ecutwfc=20.0, ecutrho=160.0, kpoints=(2, 2, 2), nstep=2),
    ),
    # An input pw.x rejects.
    "si_scf_error": dict(
        structure=silicon(),
        calculation="scf",
        settings=QESettings(ecutwfc=20.0, ecutrho=160.0, kpoints=(2, 2, 2), smearing="bogus"),
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pseudo-src", default=None, help="folder of <El>.*.UPF.gz")
    parser.add_argument("names", nargs="*", default=list(RUNS), help="runs to redo")
    args = parser.parse_args()
    for name in args.names:
        spec = dict(RUNS[name])
        spec.setdefault("settings", SETTINGS)
        with tempfile.TemporaryDirectory() as tmp:
            run = run_pw(work_dir=tmp, pseudo_src=args.pseudo_src, prefix="si", **spec)
            shutil.copyfile(Path(tmp) / "pw.in", HERE / f"{name}.in")
            # mtime=0 keeps the gzip bytes reproducible.
            with (
                open(Path(tmp) / "pw.out", "rb") as fin,
                gzip.GzipFile(HERE / f"{name}.out.gz", "wb", mtime=0) as fout,
            ):
                shutil.copyfileobj(fin, fout)
        print(
            f"{name}: {run.stop_reason}, {run.wall_s:.1f} s wall, {len(run.steps)} SCF cycles "
            f"({run.scf_iterations_total} iterations), {run.n_ionic_steps} ionic steps, "
            f"E = {run.final_energy_ry} Ry"
        )


if __name__ == "__main__":
    main()
