"""Compile every Triton kernel of ``dao.kernels`` for an NVIDIA GPU, without a GPU.

    python -m dao.kernels.compile_check [--arch 90] [--full]

Triton's interpreter (how the tests run the kernels on a CPU) executes the kernels with
NumPy, so it cannot see what only the compiler checks: the dtype and shape rules of
``tl.dot`` of the installed Triton version, layouts, register allocation (ptxas). Two
of the bugs a first GPU run found were of that kind (a float64 ``tl.dot`` that Triton
3.6 rejected). This compiles each kernel to a cubin for ``sm_<arch>`` with the
launch options its launcher uses, for float32, float64 and bfloat16 inputs (a quick
subset unless ``--full``), and exits 1 listing the failures. Run it in a fresh process
without ``TRITON_INTERPRET`` (``triton.jit`` picks interpreter or compiler when a
kernel is defined).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Jobs: (label, kernel, pointer element types by argument name, default pointer type,
# constexpr values, compile options), with the launchers' block sizes and options.
_COMPUTE = {"fp32": "fp32", "fp64": "fp64", "bf16": "fp32"}


def _signature(fn, ptr_types: dict[str, str], default_ptr: str, constexprs: dict) -> dict:
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*" + ptr_types.get(p.name, default_ptr)
        else:
            sig[p.name] = "i32"
    missing = [n for n, t in sig.items() if t == "constexpr" and n not in constexprs]
    if missing:
        raise KeyError(f"{fn.fn.__name__}: no value for constexpr {missing}")
    return sig


def _edge_attention_jobs(full: bool):
    from dao.kernels import edge_attention as ea  # noqa: PLC0415

    i64 = {n: "i64" for n in ("ptr_ptr", "tile_sys_ptr", "tile_start_ptr")}
    compute = ("phase_ptr", "gram_ptr", "acc_ptr", "lse_ptr", "dlt_ptr", "a1_ptr", "a2_ptr",
               "a3_ptr", "dfrac_dst_ptr", "dgram_ptr", "dp_ptr")  # fmt: skip
    dtypes = ("fp32", "fp64", "bf16") if full else ("fp32", "fp64")
    # (heads, head dim, heads per program of the forward)
    shapes = ((8, 48, None), (8, 48, 1), (1, 2, None)) if full else ((8, 48, None), (8, 48, 1))
    for dt in dtypes:
        ptrs = {**i64, **{n: _COMPUTE[dt] for n in compute}}
        if dt != "bf16":
            ptrs["dfrac_ptr"] = dt
        for heads, head_dim, per_program in shapes:
            kernels = [ea._edge_attention_fwd_kernel]
            if per_program is None:
                kernels += [ea._edge_attention_bwd_dst_kernel, ea._edge_attention_bwd_src_kernel]
            for fn in kernels:
                opts = ea._launch_options(heads, head_dim, per_program)
                options = {k: opts.pop(k) for k in ("num_warps", "enable_fp_fusion")}
                opts["eps"] = 1e-5
                label = f"{fn.fn.__name__} {dt} H={heads} d={head_dim}" + (
                    f" heads/program={per_program}" if per_program else ""
                )
                yield label, fn, ptrs, dt, opts, options


def _diffusion_step_jobs(full: bool):
    from dao.kernels import diffusion_step as ds  # noqa: PLC0415

    options = {"num_warps": ds._NUM_WARPS, "enable_fp_fusion": False}  # as the launchers
    for dt in ("fp32", "fp64"):
        ptrs = {"coef_ptr": "fp64"}
        yield (f"_corrector_step_fwd_kernel {dt}", ds._corrector_step_fwd_kernel, ptrs, dt,
               {"HAS_NOISE": True, "BLOCK": ds._BLOCK}, options)  # fmt: skip
        flags = {k: True for k in ("HAS_NOISE_F", "HAS_GRAD_F", "HAS_NOISE_L", "HAS_GRAD_L")}
        yield (f"_predictor_step_fwd_kernel {dt}", ds._predictor_step_fwd_kernel, ptrs, dt,
               {**flags, "BLOCK": ds._BLOCK}, options)  # fmt: skip


def _neighbor_list_jobs(full: bool):
    from dao.kernels import neighbor_list as nl  # noqa: PLC0415

    for dt in ("fp32", "fp64") if full else ("fp32",):
        ptrs = {
            "off_ptr": "i32", "orig_ptr": "i32", "atom_ptr_ptr": "i64", "tile_sys_ptr": "i64",
            "tile_start_ptr": "i64", "shift_ptr_ptr": "i64", "shift_int_ptr": "i32",
            "count_ptr": "i32", "row_off_ptr": "i64", "out_i_ptr": "i32", "out_j_ptr": "i32",
            "out_s_ptr": "i16",
        }  # fmt: skip
        for fill in (False, True):
            opts = {
                "FILL": fill, "SELF_INTERACTION": False, "WANT_D": True, "WANT_V": True,
                "BLOCK_I": nl._BLOCK_I, "BLOCK_J": nl._BLOCK_J, "BLOCK_C": nl._BLOCK_C,
            }  # fmt: skip
            options = {"num_warps": nl._NUM_WARPS, "enable_fp_fusion": False}  # as the launcher
            label = f"_neighbor_list_pairs_kernel {dt} fill={fill}"
            yield label, nl._neighbor_list_pairs_kernel, ptrs, dt, opts, options


def check(arch: int = 90, full: bool = False, out=sys.stdout) -> list[str]:
    """Compile every job for ``sm_<arch>``; returns the failure messages."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    target = GPUTarget("cuda", arch, 32)
    failures = []
    jobs = [*_edge_attention_jobs(full), *_diffusion_step_jobs(full), *_neighbor_list_jobs(full)]
    for label, fn, ptrs, dt, constexprs, options in jobs:
        t0 = time.perf_counter()
        try:
            sig = _signature(fn, ptrs, dt, constexprs)
            src = ASTSource(fn, sig, constexprs=constexprs)
            triton.compile(src, target=target, options=options)
        except Exception as exc:  # noqa: BLE001  (every failure is reported)
            msg = f"{label}: {type(exc).__name__}: {str(exc).strip()[-600:]}"
            failures.append(msg)
            print(f"FAILED {msg}", file=out, flush=True)
            continue
        print(f"ok {label} ({time.perf_counter() - t0:.1f} s)", file=out, flush=True)
    return failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--full", action="store_true", help="every dtype and head layout")
    args = p.parse_args(argv)
    failures = check(args.arch, args.full)
    print(f"{len(failures)} failure(s) compiling for sm_{args.arch}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
