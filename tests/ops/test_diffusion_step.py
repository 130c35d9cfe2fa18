"""Fused DAO-G sampling steps (``dao::corrector_step``, ``dao::predictor_step``).

The C++ and Triton backends are compared with the pure-PyTorch twin in the same dtype
(the same arithmetic, operation by operation) and, for float32, with the float64 twin;
the mod 1 is compared bit for bit with :func:`dao.diffusion.wrap_frac`.

Without a GPU the Triton kernels run in the interpreter: ``tests/conftest.py`` sets
``TRITON_INTERPRET=1`` before triton is first imported, and the ``triton_mode``
fixture re-imports the kernel module in interpreter mode if it was imported compiled
(these kernels use no triton library functions, so a reload is enough). With a GPU
the same tests run compiled on CUDA tensors.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import numpy as np
import pytest
import torch
from helpers import assert_close

from dao.diffusion import wrap_frac
from dao.ops import corrector_step, predictor_step
from dao.ops.diffusion_step import BACKENDS
from dao.reference import diffusion_step as ref

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_EXTERNAL_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_INTERPRET = _EXTERNAL_INTERPRET or not torch.cuda.is_available()
TRITON_DEVICE = "cpu" if _INTERPRET else "cuda"
DTYPES = [torch.float64, torch.float32]
P_COEFS = [0.013, 0.021, 0.35, 0.47, 1.0004, 0.11, 0.29]  # a, c_F, g_F, b, q, c_L, g_L


@pytest.fixture(scope="module")
def triton_mode():
    if not _HAS_TRITON:
        pytest.skip("needs the triton package")
    old = os.environ.get("TRITON_INTERPRET")
    if _INTERPRET:
        os.environ["TRITON_INTERPRET"] = "1"
    import dao.kernels.diffusion_step as kernels  # noqa: PLC0415
    from triton.runtime.interpreter import InterpretedFunction  # noqa: PLC0415

    if _INTERPRET != isinstance(kernels._corrector_step_fwd_kernel, InterpretedFunction):
        importlib.reload(kernels)
    yield kernels
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old


@pytest.fixture(params=["cpp", "triton"])
def backend(request):
    """(backend name, device) of a fused backend; triton runs through its fixture."""
    if request.param == "triton":
        request.getfixturevalue("triton_mode")
        return "triton", torch.device(TRITON_DEVICE)
    return "cpp", torch.device("cpu")


def _inputs(seed, n_atoms, n_crystals, dtype, device="cpu", frac_range=(-2.0, 3.0)):
    g = torch.Generator().manual_seed(seed)
    lo, hi = frac_range

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    frac = (lo + (hi - lo) * torch.rand(n_atoms, 3, generator=g, dtype=torch.float64)).to(dtype)
    tensors = dict(
        frac=frac,
        score=r(n_atoms, 3),
        noise_frac=r(n_atoms, 3),
        grad_frac=r(n_atoms, 3, scale=0.3),
        lattice=r(n_crystals, 3, 3, scale=4.0),
        eps=r(n_crystals, 3, 3),
        noise_lattice=r(n_crystals, 3, 3),
        grad_lattice=r(n_crystals, 3, 3, scale=0.5),
    )
    return {k: v.to(device) for k, v in tensors.items()}


def _predict(x, coefs, backend, device=None, terms=("nf", "gf", "nl", "gl")):
    dev = device or x["frac"].device

    def opt(key, name):
        return x[key].to(dev) if name in terms else None

    k = torch.as_tensor(coefs, dtype=torch.float64, device=dev)
    args = (
        x["frac"].to(dev),
        x["score"].to(dev),
        opt("noise_frac", "nf"),
        opt("grad_frac", "gf"),
        x["lattice"].to(dev),
        x["eps"].to(dev),
        opt("noise_lattice", "nl"),
        opt("grad_lattice", "gl"),
    )
    if backend == "ref":
        f, lat = ref.predictor_step(*args, k)
    else:
        f, lat = predictor_step(*args, k, backend=backend)
    return f.cpu(), lat.cpu()


def _centred(x: torch.Tensor) -> torch.Tensor:
    return x - torch.round(x)


# ----------------------------------------------------------------- agreement


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "n_atoms, n_crystals", [(1, 1), (7, 2), (1031, 37), (0, 3), (0, 0)], ids=str
)
def test_corrector_matches_twin(backend, dtype, n_atoms, n_crystals):
    name, dev = backend
    x = _inputs(n_atoms + 11 * n_crystals, n_atoms, n_crystals, dtype)
    k = torch.tensor([0.037, 0.19], dtype=torch.float64)
    for noise in (x["noise_frac"], None):
        got = corrector_step(
            x["frac"].to(dev),
            x["score"].to(dev),
            None if noise is None else noise.to(dev),
            k.to(dev),
            backend=name,
        ).cpu()
        want = ref.corrector_step(x["frac"], x["score"], noise, k)
        assert got.dtype == dtype and got.shape == (n_atoms, 3)
        assert_close(got, want)
        assert bool(((got >= 0) & (got < 1)).all())
        if dtype == torch.float32:
            f64 = {key: v.double() for key, v in x.items()}
            noise64 = None if noise is None else noise.double()
            want64 = ref.corrector_step(f64["frac"], f64["score"], noise64, k)
            assert_close(_centred(got.double() - want64), torch.zeros_like(want64), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "n_atoms, n_crystals", [(1, 1), (20, 1), (7, 2), (1031, 37), (0, 3), (0, 0), (5, 0)], ids=str
)
@pytest.mark.parametrize(
    "terms",
    [("nf", "gf", "nl", "gl"), (), ("nf", "nl"), ("gf", "gl"), ("nf", "gl")],
    ids=["all", "none", "noise", "guidance", "mixed"],
)
def test_predictor_matches_twin(backend, dtype, n_atoms, n_crystals, terms):
    name, dev = backend
    x = _inputs(3 * n_atoms + n_crystals, n_atoms, n_crystals, dtype)
    f, lat = _predict(x, P_COEFS, name, dev, terms)
    f_ref, lat_ref = _predict(x, P_COEFS, "ref", terms=terms)
    assert f.dtype == lat.dtype == dtype
    assert f.shape == (n_atoms, 3) and lat.shape == (n_crystals, 3, 3)
    assert_close(f, f_ref)
    assert_close(lat, lat_ref)
    assert bool(((f >= 0) & (f < 1)).all())
    if dtype == torch.float32:
        f64, lat64 = _predict({k: v.double() for k, v in x.items()}, P_COEFS, "ref", terms=terms)
        assert_close(_centred(f.double() - f64), torch.zeros_like(f64), dtype)
        assert_close(lat, lat64, dtype)


@pytest.mark.parametrize("seed", range(4))
def test_random_shapes_all_backends_agree(seed, triton_mode):
    rng = np.random.default_rng(seed)
    n_atoms, n_crystals = int(rng.integers(0, 2500)), int(rng.integers(1, 120))
    dtype = DTYPES[seed % 2]
    x = _inputs(100 + seed, n_atoms, n_crystals, dtype, frac_range=(-50.0, 50.0))
    coefs = rng.normal(size=7).tolist()
    outs = {
        "ref": _predict(x, coefs, "ref"),
        "torch": _predict(x, coefs, "torch"),
        "cpp": _predict(x, coefs, "cpp"),
        "triton": _predict(x, coefs, "triton", torch.device(TRITON_DEVICE)),
    }
    for f, lat in outs.values():
        assert_close(f, outs["ref"][0])
        assert_close(lat, outs["ref"][1])


def test_torch_backend_is_the_twin():
    x = _inputs(5, 9, 2, torch.float64)
    f, lat = _predict(x, P_COEFS, "torch")
    f_ref, lat_ref = _predict(x, P_COEFS, "ref")
    assert torch.equal(f, f_ref) and torch.equal(lat, lat_ref)


# ----------------------------------------------------------------- mod 1


_EDGE_VALUES = [
    -1e-9, -1e-30, -0.0, 0.0, -1.0, 1.0, 2.5, -0.25, 0.9999999, 1.0 - 2**-24, -(2**-25),
    -(2**-54), 3.0 - 1e-12, 1e6 + 0.25, -1e7 - 0.5, 123456.789, float("nan"),
]  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mod_one_equals_wrap_frac_bit_for_bit(backend, dtype):
    # a = 1, c = 1 and a zero score: the kernel wraps frac + noise, which the edge
    # values make land on or just below integers (where x - floor(x) rounds to 1.0).
    name, dev = backend
    values = torch.tensor(_EDGE_VALUES, dtype=dtype)
    frac = torch.cat([values, torch.zeros_like(values)]).repeat(3).reshape(-1, 3)
    noise = torch.cat([torch.zeros_like(values), values]).repeat(3).reshape(-1, 3)
    score = torch.zeros_like(frac)
    want = wrap_frac(frac + noise)
    got = corrector_step(frac.to(dev), score.to(dev), noise.to(dev), [1.0, 1.0], backend=name)
    zeros = torch.zeros(1, 3, 3, dtype=dtype, device=dev)
    f, _ = predictor_step(
        frac.to(dev), score.to(dev), noise.to(dev), None, zeros, zeros, None, None,
        [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0], backend=name,
    )  # fmt: skip
    for out in (got.cpu(), f.cpu()):
        torch.testing.assert_close(out, want, atol=0.0, rtol=0.0, equal_nan=True)
        finite = torch.isfinite(out)
        assert bool(((out[finite] >= 0) & (out[finite] < 1)).all())
    if dtype == torch.float32:  # -1e-9 + 0 rounds to 1.0 after x - floor(x): folded to 0
        assert float(got.cpu().reshape(-1)[0]) == 0.0


def test_mod_one_of_sums_that_round_to_one(backend):
    # frac + a * score lands just below 0 in float32: x - floor(x) is exactly 1.0.
    name, dev = backend
    frac = torch.zeros(4, 3)
    score = torch.tensor([-1e-9, -3e-9, -1e-12, -5e-8]).repeat_interleave(3).reshape(4, 3)
    got = corrector_step(frac.to(dev), score.to(dev), None, [1.0, 0.0], backend=name).cpu()
    assert torch.equal(got, wrap_frac(frac + score))
    assert bool((got < 1).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mod_one_on_random_bit_patterns(backend, dtype):
    # Every magnitude (subnormals, huge values, NaN): the kernels' floor must be exact.
    # No infinities and only quiet NaNs: both raise numpy's invalid-value warning in
    # the interpreter (an error under this test suite's warning filter).
    name, dev = backend
    itype = torch.int32 if dtype == torch.float32 else torch.int64
    g = torch.Generator().manual_seed(17)
    bits = torch.randint(torch.iinfo(itype).min, torch.iinfo(itype).max, (90_000,), generator=g,
                         dtype=itype)  # fmt: skip
    x = bits.view(dtype)
    x = x[~torch.isinf(x)]
    x = torch.where(torch.isnan(x), torch.full_like(x, float("nan")), x)
    x = x[: x.numel() // 3 * 3].reshape(-1, 3)
    got = corrector_step(x.to(dev), torch.zeros_like(x, device=dev), None, [0.0, 0.0],
                         backend=name).cpu()  # fmt: skip
    want = wrap_frac(x)
    same = (got.view(itype) == want.view(itype)) | (torch.isnan(got) & torch.isnan(want))
    assert bool(same.all()), x[~same.all(1)][:4]


def test_zero_noise_coefficient_equals_no_noise(backend):
    name, dev = backend
    x = _inputs(7, 12, 3, torch.float32, device=dev)
    k = [0.013, 0.0, 0.0, 0.47, 1.0004, 0.0, 0.0]
    with_noise = _predict(x, k, name, terms=("nf", "nl"))
    without = _predict(x, k, name, terms=())
    assert torch.equal(with_noise[0], without[0]) and torch.equal(with_noise[1], without[1])


# ----------------------------------------------------------------- API


def test_coefficients_as_floats_or_tensor_and_no_mutation():
    x = _inputs(3, 6, 2, torch.float64)
    before = {k: v.clone() for k, v in x.items()}
    a = corrector_step(x["frac"], x["score"], x["noise_frac"], [0.1, 0.2])
    k64 = torch.tensor([0.1, 0.2], dtype=torch.float64)
    b = corrector_step(x["frac"], x["score"], x["noise_frac"], k64)
    c = corrector_step(x["frac"], x["score"], x["noise_frac"], k64.float())
    assert torch.equal(a, b)
    assert_close(c, a, torch.float32)  # float32 coefficients are read as float64
    for k, v in x.items():
        assert torch.equal(v, before[k]), k
    # Non-contiguous inputs are fine.
    wide = torch.cat([x["frac"], x["frac"]], dim=1)[:, ::2]
    assert not wide.is_contiguous()
    assert torch.equal(
        corrector_step(wide, x["score"], None, [0.1, 0.2]),
        corrector_step(wide.contiguous(), x["score"], None, [0.1, 0.2]),
    )


def test_input_errors():
    x = _inputs(0, 4, 2, torch.float32)
    f, s, z = x["frac"], x["score"], x["noise_frac"]
    lat, eps = x["lattice"], x["eps"]
    k2, k7 = [0.1, 0.2], P_COEFS
    cases = [
        (lambda: corrector_step(f[:, :2], s[:, :2], None, k2), r"frac must be \[N, 3\]"),
        (lambda: corrector_step(f.half(), s.half(), None, k2), "float32 or float64"),
        (lambda: corrector_step(f.int(), s.int(), None, k2), "float32 or float64"),
        (lambda: corrector_step(f, s.double(), None, k2), "score must have dtype"),
        (lambda: corrector_step(f, s[:3], None, k2), r"score must have shape \[4, 3\]"),
        (lambda: corrector_step(f, s, z[:3], k2), "noise must have shape"),
        (lambda: corrector_step(f, s, None, [0.1]), r"\[2\]"),
        (lambda: corrector_step(f, s, None, torch.zeros(3)), r"\[2\]"),
        (lambda: corrector_step(f, s, None, torch.zeros(2, dtype=torch.int64)), "floating"),
        (lambda: corrector_step(f, s.to("meta"), None, k2), "must be on cpu"),
        (lambda: corrector_step(f, s, None, torch.zeros(2, device="meta")), "coefs must be on"),
        (lambda: corrector_step(f, s, None, k2, backend="cuda"), "backend must be one of"),
        (lambda: predictor_step(f, s, z, None, lat[0], eps, None, None, k7), r"\[B, 3, 3\]"),
        (lambda: predictor_step(f, s, z, None, lat, eps[:1], None, None, k7), "eps must have"),
        (lambda: predictor_step(f, s, z, None, lat.double(), eps, None, None, k7), "lattice"),
        (lambda: predictor_step(f, s, z, None, lat, eps, z, None, k7), "noise_lattice must"),
        (lambda: predictor_step(f, s, z, lat, lat, eps, None, None, k7), "grad_frac must"),
        (lambda: predictor_step(f, s, z, None, lat, eps, None, None, k2), r"\[7\]"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()
    if not torch.cuda.is_available():
        # The meta device stands in for a non-CPU device.
        with pytest.raises(ValueError, match="needs CPU tensors"):
            corrector_step(f.to("meta"), s.to("meta"), None, torch.zeros(2, device="meta"),
                           backend="cpp")  # fmt: skip


def test_not_differentiable():
    x = _inputs(1, 5, 1, torch.float64)
    f = x["frac"].clone().requires_grad_()
    with pytest.raises(ValueError, match="not differentiable"):
        corrector_step(f, x["score"], None, [0.1, 0.0])
    with pytest.raises(ValueError, match="not differentiable"):
        predictor_step(x["frac"], x["score"], None, None, x["lattice"].requires_grad_(),
                       x["eps"], None, None, P_COEFS)  # fmt: skip
    with torch.no_grad():  # fine when nothing is recorded
        out = corrector_step(f, x["score"], None, [0.1, 0.0])
    assert not out.requires_grad


# ----------------------------------------------------------------- torch.library


@pytest.mark.parametrize("name", ["cpp", "torch", "triton"])
def test_opcheck(name):
    if name == "triton":
        pytest.importorskip("triton")
    dev = TRITON_DEVICE if name == "triton" else "cpu"
    if name == "triton" and dev == "cpu" and not _INTERPRET:
        pytest.skip("triton on CPU tensors needs the interpreter")
    x = _inputs(9, 5, 2, torch.float64, device=dev)
    k2 = torch.tensor([0.1, 0.2], dtype=torch.float64, device=dev)
    k7 = torch.tensor(P_COEFS, dtype=torch.float64, device=dev)
    op = torch.ops.dao.corrector_step.default
    torch.library.opcheck(op, (x["frac"], x["score"], x["noise_frac"], k2, name))
    torch.library.opcheck(op, (x["frac"], x["score"], None, k2, name))
    args = (x["frac"], x["score"], x["noise_frac"], None, x["lattice"], x["eps"],
            x["noise_lattice"], x["grad_lattice"], k7, name)  # fmt: skip
    torch.library.opcheck(torch.ops.dao.predictor_step.default, args)


def test_torch_compile_fullgraph():
    x = _inputs(11, 8, 3, torch.float32)
    k = torch.tensor([0.1, 0.2, *P_COEFS], dtype=torch.float64)

    def step(frac, score, noise, lattice, eps, noise_l, coefs):
        f = corrector_step(frac, score, noise, coefs[:2])
        return predictor_step(f, score, noise, None, lattice, eps, noise_l, None, coefs[2:])

    args = (x["frac"], x["score"], x["noise_frac"], x["lattice"], x["eps"],
            x["noise_lattice"], k)  # fmt: skip
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(*args), step(*args), strict=True):
        assert torch.equal(got, want)


def test_backend_names():
    assert BACKENDS == ("auto", "cpp", "triton", "torch")
    x = _inputs(2, 3, 1, torch.float64)
    auto = _predict(x, P_COEFS, "auto")
    cpp = _predict(x, P_COEFS, "cpp")
    assert torch.equal(auto[0], cpp[0]) and torch.equal(auto[1], cpp[1])
