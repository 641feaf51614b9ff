"""The ``cpp`` backend (C++ CPU kernels of ``ippo._C``) against the torch reference.

Every kernel test runs on each instruction-set build this CPU supports (base / avx2 / avx512),
with fresh random inputs, odd sizes that are no multiple of any block size, sizes that cross
the K-block (256), q-block (256) and sketch chunk boundaries, and outputs poisoned with NaN
before the call. Errors: fp32 <= 1e-5 and fp64 <= 1e-12 relative (||out - ref|| / ||ref||) to
the reference evaluated in fp64 on the same inputs.

Speed (by hand, not a test):  python tests/test_cpp_ops.py
"""

from __future__ import annotations

import itertools
import time
import zlib

import pytest
import torch

try:
    from ippo import _C
except ImportError as e:  # pragma: no cover - depends on the build
    pytest.skip(
        f"ippo._C is not importable ({e}); build it with `pip install --no-build-isolation -e .`",
        allow_module_level=True,
    )

from ippo.influence import ops
from ippo.influence.ops import cpp as cpp_ops
from ippo.influence.ops import reference as R

ISAS = _C.available_cpu_isas()
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


# ---------------------------------------------------------------------------------------------
# helpers and fixtures


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rnd(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    """Standard normal (never all zeros), generated in fp64 and rounded to dtype."""
    return torch.randn(*shape, dtype=torch.float64, generator=_gen(seed)).to(dtype)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite values in the output"
    den = ref.norm().item()
    num = (out - ref).norm().item()
    return num / den if den > 0 else num


def seed_of(*parts) -> int:
    """A stable seed per test case (str hashes are salted per process; crc32 is not)."""
    return zlib.crc32(repr(parts).encode()) % (2**31)


@pytest.fixture(params=ISAS)
def isa(request):
    _C.set_cpu_isa(request.param)
    assert _C.cpu_isa() == request.param
    yield request.param
    _C.set_cpu_isa("auto")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every output buffer starts as NaN (True for bool): the kernels must write every element."""

    def poisoned(shape, dtype):
        if dtype == torch.bool:
            return torch.ones(shape, dtype=dtype)
        return torch.full(shape, float("nan"), dtype=dtype)

    monkeypatch.setattr(cpp_ops, "_empty", poisoned)


# ---------------------------------------------------------------------------------------------
# module surface


def test_module_surface():
    info = _C.build_info()
    assert isinstance(info, str) and "ippo._C" in info
    assert isinstance(_C.cuda_compiled(), bool)
    n, msg = _C.cuda_device_count()
    assert isinstance(n, int) and isinstance(msg, str) and msg
    if not _C.cuda_compiled():
        assert n == 0
    if n == 0:
        assert msg  # a reason, e.g. "cudaGetDeviceCount failed: ..."
    assert "base" in ISAS
    with pytest.raises(ValueError, match="unknown CPU ISA"):
        _C.set_cpu_isa("sse9")


CPP_OPS = ("exact_token_scores", "projected_token_scores", "segment_sketch", "segment_sum", "select_episodes")


def test_dispatch_uses_cpp_ops():
    """``ops.get("cpp")`` checks the arguments (tests/influence/ops/test_contract.py), then runs these."""
    ns = ops.get("cpp")
    for name in CPP_OPS:
        assert getattr(ns, name).__wrapped__ is getattr(cpp_ops, name), name
    for name in set(ops.OPS) - set(CPP_OPS):  # ops without a C++ kernel fall back to the reference
        assert getattr(ns, name).__wrapped__ is (getattr(cpp_ops, name, None) or getattr(R, name)), name


# ---------------------------------------------------------------------------------------------
# exact_token_scores

EXACT_SHAPES = [  # (N, d_in, d_out)
    (1, 1, 1),
    (7, 5, 3),
    (1, 37, 5),
    (333, 37, 130),
    (333, 130, 17),
    (7, 130, 37),
    (333, 5, 1),
    (64, 300, 270),  # crosses the K block (256)
    (50, 520, 40),  # two K-block boundaries
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", EXACT_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_exact_token_scores(isa, dtype, shape, bias):
    n, d_in, d_out = shape
    s = seed_of("exact", shape, bias)
    x, dy, g = (
        rnd(n, d_in, dtype=dtype, seed=s),
        rnd(n, d_out, dtype=dtype, seed=s + 1),
        rnd(d_out, d_in, dtype=dtype, seed=s + 2),
    )
    b = rnd(d_out, dtype=dtype, seed=s + 3) if bias else None
    out = cpp_ops.exact_token_scores(x, dy, g, b)
    ref = R.exact_token_scores(x.double(), dy.double(), g.double(), None if b is None else b.double())
    assert out.dtype == dtype and out.shape == (n,)
    assert rel(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_exact_token_scores_low_precision_inputs(dtype):
    x, dy, g, b = (
        rnd(37, 130, dtype=dtype, seed=1),
        rnd(37, 17, dtype=dtype, seed=2),
        rnd(17, 130, dtype=dtype, seed=3),
        rnd(17, dtype=dtype, seed=4),
    )
    out = cpp_ops.exact_token_scores(x, dy, g, b)
    assert out.dtype == R.exact_token_scores(x, dy, g, b).dtype == torch.float32
    ref = R.exact_token_scores(x.double(), dy.double(), g.double(), b.double())  # same upcast inputs
    assert rel(out, ref) <= 1e-5


def test_exact_token_scores_strided_inputs(isa):
    wide = rnd(40, 64, seed=5)
    x = wide[:, 3:40]  # row stride 64 > d_in = 37: passed through as is
    dy = rnd(17, 40, seed=6).T  # column-major: made contiguous on the Python side
    g = rnd(37, 17, seed=7).T
    b = rnd(34, seed=8)[::2]  # strided vector
    out = cpp_ops.exact_token_scores(x, dy, g, b)
    ref = R.exact_token_scores(x.double(), dy.double(), g.double(), b.double())
    assert rel(out, ref) <= 1e-5


def test_empty_token_set():
    x, dy, g = rnd(0, 5), rnd(0, 3), rnd(3, 5)
    assert cpp_ops.exact_token_scores(x, dy, g).shape == (0,)
    assert cpp_ops.projected_token_scores(x, dy, rnd(2, 5), None, rnd(2, 3), rnd(2)).shape == (0,)
    ids = torch.zeros(0, dtype=torch.int64)
    assert torch.equal(
        cpp_ops.segment_sketch(x, dy, rnd(2, 5), None, rnd(4, 3), ids, 3), torch.zeros(3, 4, 2)
    )
    assert torch.equal(cpp_ops.segment_sum(rnd(0), ids, 2), torch.zeros(2))


@pytest.mark.parametrize("threads", [1, 2])
def test_deterministic_across_threads(threads):
    x, dy, g = rnd(1000, 70, seed=1), rnd(1000, 50, seed=2), rnd(50, 70, seed=3)
    pi, po = rnd(17, 70, seed=4), rnd(3, 50, seed=5)
    ids = torch.randint(-1, 9, (1000,), generator=_gen(6))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        s1 = cpp_ops.exact_token_scores(x, dy, g)
        k1 = cpp_ops.segment_sketch(x, dy, pi, None, po, ids, 9)
        torch.set_num_threads(threads)
        s2 = cpp_ops.exact_token_scores(x, dy, g)
        k2 = cpp_ops.segment_sketch(x, dy, pi, None, po, ids, 9)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(s1, s2)
    assert torch.equal(k1, k2)


# ---------------------------------------------------------------------------------------------
# projected_token_scores

PROJ_SHAPES = [  # (N, d_in, d_out, q)
    (1, 1, 1, 1),
    (7, 5, 3, 3),
    (333, 37, 130, 17),
    (7, 130, 5, 1),
    (333, 5, 37, 300),  # crosses the q block (256)
    (40, 270, 300, 3),  # crosses the K block on both sides
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", PROJ_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_projected_token_scores(isa, dtype, shape, bias):
    n, d_in, d_out, q = shape
    s = seed_of("proj", shape, bias)
    x, dy = rnd(n, d_in, dtype=dtype, seed=s), rnd(n, d_out, dtype=dtype, seed=s + 1)
    pi, po, w = (
        rnd(q, d_in, dtype=dtype, seed=s + 2),
        rnd(q, d_out, dtype=dtype, seed=s + 3),
        rnd(q, dtype=dtype, seed=s + 4),
    )
    pb = rnd(q, dtype=dtype, seed=s + 5) if bias else None
    out = cpp_ops.projected_token_scores(x, dy, pi, pb, po, w)
    ref = R.projected_token_scores(
        x.double(), dy.double(), pi.double(), None if pb is None else pb.double(), po.double(), w.double()
    )
    assert out.dtype == dtype and out.shape == (n,)
    assert rel(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_projected_token_scores_low_precision_inputs(dtype):
    args = [
        rnd(33, 37, seed=1),
        rnd(33, 5, seed=2),
        rnd(17, 37, seed=3),
        rnd(17, seed=4),
        rnd(17, 5, seed=5),
        rnd(17, seed=6),
    ]
    args = [a.to(dtype) for a in args]
    out = cpp_ops.projected_token_scores(*args)
    assert out.dtype == torch.float32
    ref = R.projected_token_scores(*[a.double() for a in args])
    assert rel(out, ref) <= 1e-5


# ---------------------------------------------------------------------------------------------
# segment_sketch


def _ids(n: int, e: int, seed: int, p_skip: float = 0.1, used: int | None = None) -> torch.Tensor:
    """Random episode ids in [0, used or e) with a fraction p_skip of -1 tokens."""
    g = _gen(seed)
    ids = torch.randint(0, used or e, (n,), generator=g)
    ids[torch.rand(n, generator=g) < p_skip] = -1
    return ids


SKETCH_CASES = [  # (N, d_in, d_out, k_in, k_out, E, ids kind)
    (1, 1, 1, 1, 1, 1, "all"),
    (7, 5, 3, 3, 17, 4, "random"),
    (333, 37, 130, 17, 3, 1, "random"),  # E = 1: one long segment with skipped tokens
    (333, 130, 37, 3, 1, 50, "sparse"),  # many empty episodes
    (333, 37, 5, 17, 17, 7, "sorted"),  # contiguous runs, as produced by rollouts
    (200, 300, 270, 33, 40, 6, "random"),  # crosses the K block
    (13000, 5, 3, 3, 1, 3, "random"),  # crosses the token chunk of the sketch
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", SKETCH_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_segment_sketch(isa, dtype, case, bias):
    n, d_in, d_out, k_in, k_out, e, kind = case
    s = seed_of("sketch", case, bias)
    x, dy = rnd(n, d_in, dtype=dtype, seed=s), rnd(n, d_out, dtype=dtype, seed=s + 1)
    pi, po = rnd(k_in, d_in, dtype=dtype, seed=s + 2), rnd(k_out, d_out, dtype=dtype, seed=s + 3)
    pb = rnd(k_in, dtype=dtype, seed=s + 4) if bias else None
    if kind == "all":
        ids = torch.zeros(n, dtype=torch.int64)
    elif kind == "sparse":
        ids = _ids(n, e, s + 5, used=3) * 13  # episodes 0, 13, 26 only (and -13 -> -1 below)
        ids[ids < 0] = -1
    elif kind == "sorted":
        ids = torch.sort(_ids(n, e, s + 5, p_skip=0.0)).values
        ids[-5:] = -1
    else:
        ids = _ids(n, e, s + 5)
    out = cpp_ops.segment_sketch(x, dy, pi, pb, po, ids, e)
    ref = R.segment_sketch(
        x.double(), dy.double(), pi.double(), None if pb is None else pb.double(), po.double(), ids, e
    )
    assert out.dtype == dtype and out.shape == (e, k_out, k_in)
    present = torch.zeros(e, dtype=torch.bool)
    present[ids[ids >= 0]] = True
    assert torch.equal(out[~present], torch.zeros_like(out[~present])), "empty episodes must stay 0"
    assert rel(out, ref) <= TOL[dtype]


def test_segment_sketch_all_tokens_skipped(isa):
    out = cpp_ops.segment_sketch(rnd(9, 4), rnd(9, 3), rnd(2, 4), rnd(2), rnd(5, 3), torch.full((9,), -1), 3)
    assert torch.equal(out, torch.zeros(3, 5, 2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_segment_sketch_low_precision_inputs(dtype):
    x, dy, pi, pb, po = (
        rnd(*sh, seed=i).to(dtype) for i, sh in enumerate([(99, 37), (99, 5), (17, 37), (17,), (3, 5)])
    )
    ids = _ids(99, 6, 7)
    out = cpp_ops.segment_sketch(x, dy, pi, pb, po, ids, 6)
    assert out.dtype == torch.float32
    ref = R.segment_sketch(x.double(), dy.double(), pi.double(), pb.double(), po.double(), ids, 6)
    assert rel(out, ref) <= 1e-5


# ---------------------------------------------------------------------------------------------
# segment_sum


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,e", [(1, 1), (7, 3), (333, 1), (333, 50), (5000, 17)])
def test_segment_sum(dtype, n, e):
    v = rnd(n, dtype=dtype, seed=n + e)
    ids = _ids(n, e, n * e)
    out = cpp_ops.segment_sum(v, ids, e)
    ref = R.segment_sum(v.double(), ids, e)
    assert out.dtype == dtype
    assert rel(out, ref) <= TOL[dtype]
    assert torch.equal(out, R.segment_sum(v, ids, e))  # token order, like index_add_ on the CPU


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64])
def test_segment_sum_other_dtypes(dtype):
    v = (rnd(100, seed=3) * 4).to(dtype)
    ids = _ids(100, 7, 4)
    out = cpp_ops.segment_sum(v, ids, 7)
    ref = R.segment_sum(v, ids, 7)
    assert out.dtype == ref.dtype == dtype
    exact = R.segment_sum(v.double(), ids, 7)
    torch.testing.assert_close(out.double(), exact, rtol=2e-2, atol=5e-2)


# ---------------------------------------------------------------------------------------------
# select_episodes and drop_count

RULES = {
    "threshold": [0.0, 0.3, -0.5, 1e9, 0.1],
    "bottom_fraction": [0.0, 0.1, 0.29, 0.5, 0.999, 1.0],
    "negative_bottom_fraction": [0.0, 0.1, 0.29, 0.5, 1.0],
}


def _score_sets(dtype):
    g = _gen(11)
    return {
        "random": torch.randn(101, generator=g, dtype=torch.float64).to(dtype),
        "ties": torch.randint(-3, 4, (64,), generator=g).to(dtype) / 2,
        "all_negative": -torch.rand(37, generator=g, dtype=torch.float64).to(dtype) - 0.01,
        "all_positive": torch.rand(37, generator=g, dtype=torch.float64).to(dtype) + 0.01,
        "single": torch.tensor([-0.25], dtype=dtype),
        "zeros_and_signed_zero": torch.tensor([0.0, -0.0, 0.0, 1.0, -1.0], dtype=dtype),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rule", list(RULES))
def test_select_episodes_matches_reference(dtype, rule):
    for name, scores in _score_sets(dtype).items():
        for value in RULES[rule]:
            keep, w = cpp_ops.select_episodes(scores, rule, value)
            rkeep, rw = R.select_episodes(scores, rule, value)
            assert keep.dtype == torch.bool and w.dtype == rw.dtype == dtype
            assert torch.equal(keep, rkeep), (name, rule, value)
            assert torch.equal(w[~keep], torch.zeros_like(w[~keep]))
            # a kept mean of 0 gives inf/nan weights in both (callers decide what that means)
            fin = torch.isfinite(rw)
            assert torch.equal(fin, torch.isfinite(w)), (name, rule, value)
            assert torch.equal(w[~fin].double().nan_to_num(), rw[~fin].double().nan_to_num())
            w, rw = w[fin], rw[fin]
            if dtype == torch.float64:
                assert rel(w, rw) <= 1e-12, (name, rule, value)
            elif dtype == torch.float32:
                assert rel(w, rw) <= 1e-6, (name, rule, value)
            else:  # the reference divides by a mean rounded to 16 bits
                torch.testing.assert_close(w.double(), rw.double(), rtol=2e-2, atol=1e-3)


def test_select_episodes_threshold_rounds_value_like_torch():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        scores = torch.tensor([0.1, 0.2, 0.05], dtype=dtype)  # contains value rounded to dtype
        keep, _ = cpp_ops.select_episodes(scores, "threshold", 0.1)
        assert torch.equal(keep, R.select_episodes(scores, "threshold", 0.1)[0]), dtype
        assert keep.tolist() == [False, True, False]


def test_select_episodes_stable_ties():
    scores = torch.tensor([1.0, -1.0, -1.0, -1.0, 2.0, -1.0], dtype=torch.float64)
    keep, _w = cpp_ops.select_episodes(scores, "bottom_fraction", 0.5)  # drops 3 of the four -1
    assert keep.tolist() == [True, False, False, False, True, True]
    assert torch.equal(keep, R.select_episodes(scores, "bottom_fraction", 0.5)[0])


def test_select_episodes_nothing_kept():
    keep, w = cpp_ops.select_episodes(torch.tensor([0.5, -1.0]), "threshold", 3.0)
    assert not keep.any() and torch.equal(w, torch.zeros(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("rule", list(RULES))
def test_select_episodes_empty(dtype, rule):
    keep, w = cpp_ops.select_episodes(torch.zeros(0, dtype=dtype), rule, 0.5)
    assert keep.shape == w.shape == (0,) and keep.dtype == torch.bool and w.dtype == dtype


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_select_episodes_non_finite(bad):
    scores = torch.tensor([0.5, 1.0, bad, bad, 2.0])
    for rule in RULES:
        with pytest.raises(ValueError, match="first bad episode: 2"):
            cpp_ops.select_episodes(scores, rule, 0.5)


def test_select_episodes_bad_arguments():
    """Checked by the contract before the C++ filter runs (every case on every backend: test_contract.py)."""
    s, select = torch.randn(5), ops.get("cpp").select_episodes
    with pytest.raises(ValueError, match="unknown rule"):
        select(s, "top_k", 0.5)
    with pytest.raises(ValueError, match="unknown rule"):
        select(torch.zeros(0), "top_k", 0.5)
    for rule in ("bottom_fraction", "negative_bottom_fraction"):
        for v in (-0.1, 1.5, float("nan")):
            with pytest.raises(ValueError, match="fraction in"):
                select(s, rule, v)
    with pytest.raises(ValueError, match="1-D"):
        select(torch.randn(2, 3))
    with pytest.raises(ValueError, match="floating"):
        select(torch.arange(4))


def test_drop_count_matches_reference():
    fractions = [i / 100 for i in range(101)] + [0.29, 0.57, 1 / 3, 2 / 3, 0.1 + 0.2, 1e-12, 1 - 1e-12]
    for f, n in itertools.product(fractions, [0, 1, 3, 7, 10, 100, 333, 1000, 12345]):
        assert cpp_ops.drop_count(f, n) == R.drop_count(f, n), (f, n)


# ---------------------------------------------------------------------------------------------
# bad inputs (through ops.get: the contract; every op on every backend in test_contract.py)


def _sketch_args(**over):
    args = {
        "x": rnd(6, 4),
        "dy": rnd(6, 3),
        "p_in": rnd(2, 4),
        "p_in_bias": None,
        "p_out": rnd(5, 3),
        "token_episode": torch.tensor([0, 1, -1, 2, 2, 0]),
        "num_episodes": 3,
    }
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over,match",
    [
        ({"token_episode": torch.tensor([0.0, 1, -1, 2, 2, 0])}, "token_episode must be an integer tensor"),
        ({"token_episode": torch.tensor([0, 1, -1, 2, 2])}, "token_episode length"),
        ({"token_episode": torch.tensor([0, 1, -1, 3, 2, 0])}, r"\[-1, 3\)"),
        ({"token_episode": torch.tensor([0, 1, -2, 2, 2, 0])}, r"\[-1, 3\)"),
        ({"dy": rnd(5, 3)}, "dy.shape"),
        ({"p_in": rnd(2, 5)}, "p_in.shape"),
        ({"p_out": rnd(5, 4)}, "p_out.shape"),
        ({"p_in_bias": rnd(3)}, "p_in_bias length"),
        ({"x": torch.ones(6, 4, dtype=torch.int64)}, "x must be a floating"),
        ({"x": rnd(6, 4, 1)}, "x must be 2-D"),
        ({"x": rnd(6, 4).to("meta")}, "all tensors must be on one device: dy is on cpu, x on meta"),
        ({"p_out": rnd(5, 3).to("meta")}, "all tensors must be on one device: p_out is on meta"),
        ({"num_episodes": -1}, "num_episodes"),
    ],
)
def test_bad_inputs_raise_value_error(over, match):
    with pytest.raises(ValueError, match=match):
        ops.get("cpp").segment_sketch(**_sketch_args(**over))


def test_bad_inputs_other_ops():
    x, dy, ns = rnd(6, 4), rnd(6, 3), ops.get("cpp")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ns.segment_sketch(**_sketch_args(x=[[1.0]]))
    with pytest.raises(ValueError, match="g.shape"):
        ns.exact_token_scores(x, dy, rnd(4, 3))
    with pytest.raises(ValueError, match="g_bias length"):
        ns.exact_token_scores(x, dy, rnd(3, 4), rnd(4))
    with pytest.raises(ValueError, match="all tensors must be on one device: g is on meta"):
        ns.exact_token_scores(x, dy, rnd(3, 4).to("meta"))
    with pytest.raises(ValueError, match="x must be a cpu tensor for the cpp backend, got device meta"):
        ns.exact_token_scores(x.to("meta"), dy.to("meta"), rnd(3, 4).to("meta"))
    with pytest.raises(ValueError, match="weight length"):
        ns.projected_token_scores(x, dy, rnd(2, 4), None, rnd(2, 3), rnd(3))
    with pytest.raises(ValueError, match="p_out.shape"):
        ns.projected_token_scores(x, dy, rnd(2, 4), None, rnd(3, 3), rnd(2))
    with pytest.raises(ValueError, match="token_episode"):
        ns.segment_sum(rnd(6), torch.tensor([0, 1, 2, 3, 0, 0]), 3)
    with pytest.raises(ValueError, match="token_episode must be an integer tensor"):
        ns.segment_sum(rnd(6), torch.zeros(6, dtype=torch.float64), 3)
    with pytest.raises(ValueError, match="token_episode length"):
        ns.segment_sum(rnd(5), torch.zeros(6, dtype=torch.int64), 3)
    assert torch.equal(ns.segment_sum(rnd(6), torch.zeros(6, dtype=torch.int32), 3),
                       ns.segment_sum(rnd(6), torch.zeros(6, dtype=torch.int64), 3))  # int32 ids are fine


def test_cpp_layer_rechecks_ids():
    """The extension validates ids itself too (defence in depth behind the Python checks)."""
    v = torch.ones(3, dtype=torch.float64)
    ids = torch.tensor([0, 5, 1])
    out = torch.empty(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="outside"):
        _C.segment_sum("float64", v.data_ptr(), ids.data_ptr(), 3, 2, out.data_ptr())
    with pytest.raises(ValueError, match="dtype"):
        _C.segment_sum("int8", v.data_ptr(), ids.data_ptr(), 3, 2, out.data_ptr())


# ---------------------------------------------------------------------------------------------
# speed (by hand)


def _bench(fn, *args, repeat=10, clock=time.perf_counter):
    fn(*args)
    best = float("inf")
    for _ in range(repeat):
        t = clock()
        fn(*args)
        best = min(best, clock() - t)
    return best


def main() -> None:  # pragma: no cover - manual benchmark
    """Wall time with 2 threads, and CPU time with 1 thread (robust on a shared, busy machine)."""
    print(_C.build_info())
    old = torch.get_num_threads()
    for d in (256, 1024):
        n = 4096
        x, dy, g, b = rnd(n, d, seed=1), rnd(n, d, seed=2), rnd(d, d, seed=3), rnd(d, seed=4)
        flops = 2 * n * d * d
        for threads, clock, what in ((2, time.perf_counter, "wall"), (1, time.process_time, "CPU time")):
            torch.set_num_threads(threads)
            t_ref = _bench(R.exact_token_scores, x, dy, g, b, clock=clock)
            t_cpp = _bench(cpp_ops.exact_token_scores, x, dy, g, b, clock=clock)
            print(
                f"exact_token_scores fp32 N={n} d_in=d_out={d}, {threads} thread(s), {what}: "
                f"torch {t_ref * 1e3:.2f} ms ({flops / t_ref / 1e9:.0f} GFLOP/s), "
                f"cpp {t_cpp * 1e3:.2f} ms ({flops / t_cpp / 1e9:.0f} GFLOP/s), cpp/torch {t_cpp / t_ref:.2f}"
            )
    torch.set_num_threads(old)


if __name__ == "__main__":  # pragma: no cover
    main()
