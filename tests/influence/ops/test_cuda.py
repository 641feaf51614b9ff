"""The ``cuda`` backend (CUDA kernels of ``ippo._C``, ``csrc/cuda/*.cu``) against the torch reference.

Two groups:

* Always run (no GPU needed): a CUDA build of ``ippo._C`` exposes every launcher (a build that silently
  drops the kernels fails here), and ``ops.get("cuda")`` rejects CPU tensors with a clear ``ValueError``
  (the argument contract, ``contract.py``: tests/influence/ops/test_contract.py feeds every bad input).
* GPU only (skipped with the reason from ``ippo.influence.backends()["cuda"]`` otherwise): every op on fresh random
  inputs (never zeros) with outputs poisoned with NaN, odd shapes (N, d, k no multiple of the 64-wide
  tiles or the 16-wide K step; E = 1; empty episodes; ids of -1; an episode longer than a tile), forced
  splits, fp32 / fp16 / bf16 inputs, mixed and strided inputs; the selection ops on ties (incl. -0.0 vs
  +0.0), all-negative scores, NaN/Inf (ValueError naming the first bad episode), E = 0; determinism (two
  runs bitwise equal). Errors are ``||out - ref|| / ||ref||`` against the reference evaluated in fp64 on
  the same (rounded) inputs: fp32 <= 1e-5, fp16 <= 2e-3, bf16 <= 1e-2 (the kernels compute in fp32
  without TF32, so in practice all three land near 1e-6).
"""

from __future__ import annotations

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
from ippo.influence.backends import backends
from ippo.influence.ops import cuda as cuda_ops
from ippo.influence.ops import reference as R

CUDA = backends()["cuda"]
DEVICE = "cuda"  # the device of the GPU tests (a module global, looked up at call time)
needs_gpu = pytest.mark.skipif(not CUDA, reason=f"cuda backend unavailable: {CUDA.reason}")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = list(TOL)


# ---------------------------------------------------------------------------------------------
# helpers


def seed_of(*parts) -> int:
    """A stable seed per test case (str hashes are salted per process; crc32 is not)."""
    return zlib.crc32(repr(parts).encode()) % (2**31)


def rnd(*shape, dtype=torch.float32, seed=0, device=None) -> torch.Tensor:
    """Standard normal (never all zeros), generated in fp64 on the CPU, rounded to dtype, moved."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, generator=g).to(dtype).to(device or DEVICE)


def ids_for(n: int, e: int, seed: int, device=None) -> torch.Tensor:
    """Random episode ids in [-1, e) (shuffled: episodes are not contiguous in the token order)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, max(e, 0), (n,), generator=g, dtype=torch.int64).to(device or DEVICE)


def d64(t):
    return None if t is None else t.double()


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite values in the output (an element was not written?)"
    den = ref.norm().item()
    num = (out - ref).norm().item()
    return num / den if den > 0 else num


@pytest.fixture
def poisoned(monkeypatch):
    """Every output buffer starts as NaN (True for bool): the kernels must write every element."""

    def poison(shape, dtype, device):
        if dtype == torch.bool:
            return torch.ones(shape, dtype=dtype, device=device)
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(cuda_ops, "_empty", poison)


# ---------------------------------------------------------------------------------------------
# runs everywhere


def test_binding_exposes_launchers():
    if not _C.cuda_compiled():
        pytest.skip("ippo._C was built without CUDA (IPPO_CUDA=0 or no nvcc)")
    missing = [name for name in cuda_ops.KERNEL_NAMES if not hasattr(_C, name)]
    assert not missing, f"CUDA build of ippo._C lacks the launchers {missing}"
    assert sorted(_C.cuda_kernel_names()) == sorted(cuda_ops.KERNEL_NAMES)
    assert _C.cuda_tile_sizes() == (cuda_ops.TILE, cuda_ops.TILE)
    n, msg = _C.cuda_device_count()
    assert isinstance(n, int) and isinstance(msg, str) and msg


def test_dispatch_uses_cuda_ops():
    ns = ops.get("cuda")
    for name in ops.OPS:
        assert getattr(ns, name).__wrapped__ is getattr(cuda_ops, name), name


def test_cpu_tensors_are_rejected():
    cpu = {"device": "cpu"}
    x, dy, g = rnd(5, 4, **cpu), rnd(5, 3, **cpu), rnd(3, 4, **cpu)
    pi, po, w = rnd(2, 4, **cpu), rnd(2, 3, **cpu), rnd(2, **cpu)
    ids = torch.tensor([0, 1, -1, 0, 1])
    ns, on_cpu = ops.get("cuda"), "cuda tensor for the cuda backend, got device cpu"
    with pytest.raises(ValueError, match=on_cpu):
        ns.exact_token_scores(x, dy, g)
    with pytest.raises(ValueError, match=on_cpu):
        ns.projected_token_scores(x, dy, pi, None, po, w)
    with pytest.raises(ValueError, match=on_cpu):
        ns.segment_sketch(x, dy, pi, None, po, ids, 2)
    with pytest.raises(ValueError, match=on_cpu):
        ns.segment_sum(rnd(5, **cpu), ids, 2)
    with pytest.raises(ValueError, match=on_cpu):
        ns.select_episodes(rnd(4, **cpu), "threshold", 0.0)
    with pytest.raises(ValueError, match=on_cpu):
        ns.score_and_select(rnd(4, 3, **cpu), rnd(3, **cpu))
    with pytest.raises(ValueError, match="1-D"):
        ns.select_episodes(rnd(4, 2, **cpu))
    with pytest.raises(ValueError, match="target length"):
        ns.score_and_select(rnd(4, 3, **cpu), rnd(2, **cpu))


# ---------------------------------------------------------------------------------------------
# exact / projected token scores (GPU)

TOKEN_SHAPES = [  # (N, d_in, d_out or q)
    (1, 1, 1),
    (7, 5, 3),
    (65, 17, 63),
    (333, 37, 130),
    (200, 130, 17),
    (64, 64, 64),
    (129, 300, 200),
]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", TOKEN_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("split", [None, 1, 3])
def test_exact_token_scores(poisoned, dtype, shape, bias, split):
    n, d_in, d_out = shape
    s = seed_of("exact", shape, bias)
    x, dy, g = (
        rnd(n, d_in, dtype=dtype, seed=s),
        rnd(n, d_out, dtype=dtype, seed=s + 1),
        rnd(d_out, d_in, seed=s + 2),
    )
    b = rnd(d_out, seed=s + 3) if bias else None
    out = cuda_ops._exact_token_scores(x, dy, g, b, split=split)
    assert out.dtype == torch.float32 and out.shape == (n,) and out.device == x.device
    ref = R.exact_token_scores(x.double(), dy.double(), g.double(), d64(b))
    assert rel(out, ref) <= TOL[dtype]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", TOKEN_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("split", [None, 1, 2])
def test_projected_token_scores(poisoned, dtype, shape, bias, split):
    n, d, q = shape
    d_out = d + 3
    s = seed_of("proj", shape, bias)
    x, dy = rnd(n, d, dtype=dtype, seed=s), rnd(n, d_out, dtype=dtype, seed=s + 1)
    pi, po, w = rnd(q, d, seed=s + 2), rnd(q, d_out, seed=s + 3), rnd(q, seed=s + 4)
    pb = rnd(q, seed=s + 5) if bias else None
    out = cuda_ops._projected_token_scores(x, dy, pi, pb, po, w, split=split)
    assert out.dtype == torch.float32 and out.shape == (n,)
    ref = R.projected_token_scores(x.double(), dy.double(), pi.double(), d64(pb), po.double(), w.double())
    assert rel(out, ref) <= TOL[dtype]


@needs_gpu
def test_token_scores_mixed_strided_and_low_precision_operands(poisoned):
    wide = rnd(90, 80, seed=1)
    x = wide[:, 3:40].to(torch.bfloat16)  # row stride 80 > d_in = 37
    dy = rnd(17, 90, seed=2).T  # column-major fp32: made contiguous, x upcast to fp32 (mixed dtypes)
    g = rnd(37, 17, seed=3, dtype=torch.float16).T  # fp16, transposed
    b = rnd(34, seed=4)[::2]
    out = cuda_ops.exact_token_scores(x, dy, g, b)
    ref = R.exact_token_scores(x.double(), dy.double(), g.double(), b.double())
    assert rel(out, ref) <= 1e-5
    pi, po, w = rnd(70, 37, seed=5, dtype=torch.bfloat16), rnd(70, 17, seed=6), rnd(70, seed=7)
    out = cuda_ops.projected_token_scores(x, dy, pi, None, po, w)
    ref = R.projected_token_scores(x.double(), dy.double(), pi.double(), None, po.double(), w.double())
    assert rel(out, ref) <= 1e-5


@needs_gpu
def test_fp64_goes_to_the_reference():
    x, dy, g = rnd(9, 5, dtype=torch.float64), rnd(9, 4, dtype=torch.float64, seed=1), rnd(4, 5, seed=2)
    out = cuda_ops.exact_token_scores(x, dy, g)
    assert out.dtype == torch.float64
    assert torch.equal(out, R.exact_token_scores(x, dy, g))


@needs_gpu
def test_empty_and_degenerate_sizes(poisoned):
    x, dy = rnd(0, 5), rnd(0, 3)
    assert cuda_ops.exact_token_scores(x, dy, rnd(3, 5)).shape == (0,)
    assert cuda_ops.projected_token_scores(x, dy, rnd(2, 5), None, rnd(2, 3), rnd(2)).shape == (0,)
    ids = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    sk = cuda_ops.segment_sketch(x, dy, rnd(2, 5), rnd(2), rnd(4, 3), ids, 3)
    assert torch.equal(sk.cpu(), torch.zeros(3, 4, 2))
    assert torch.equal(cuda_ops.segment_sum(rnd(0), ids, 2).cpu(), torch.zeros(2))
    # d_out = 0 / q = 0: empty sums are zeros
    x = rnd(10, 5)
    assert torch.equal(cuda_ops.exact_token_scores(x, rnd(10, 0), rnd(0, 5)).cpu(), torch.zeros(10))
    out = cuda_ops.projected_token_scores(x, rnd(10, 3), rnd(0, 5), None, rnd(0, 3), rnd(0))
    assert torch.equal(out.cpu(), torch.zeros(10))
    # d_in = 0: the score is the bias term only
    dy, b = rnd(10, 3, seed=1), rnd(3, seed=2)
    out = cuda_ops.exact_token_scores(rnd(10, 0), dy, rnd(3, 0), b)
    assert (
        rel(out, R.exact_token_scores(rnd(10, 0).double(), dy.double(), rnd(3, 0).double(), b.double()))
        < 1e-6
    )


# ---------------------------------------------------------------------------------------------
# segment sketch / segment sum (GPU)

SKETCH_CASES = [  # (N, d_in, d_out, k_in, k_out, E)
    (1, 3, 2, 1, 1, 1),
    (50, 17, 9, 5, 7, 1),  # E = 1
    (300, 37, 23, 70, 65, 4),  # k > one tile, episodes longer than a 64-token tile
    (200, 64, 64, 64, 64, 9),  # exact tile multiples
    (150, 20, 30, 16, 8, 40),  # many episodes, some empty
    (1000, 33, 40, 12, 20, 2),  # long segments (forced split below)
]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SKETCH_CASES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("split", [None, 1, 3])
def test_segment_sketch(poisoned, dtype, case, bias, split):
    n, d_in, d_out, k_in, k_out, e = case
    s = seed_of("sketch", case, bias)
    x, dy = rnd(n, d_in, dtype=dtype, seed=s), rnd(n, d_out, dtype=dtype, seed=s + 1)
    pi, po = rnd(k_in, d_in, seed=s + 2), rnd(k_out, d_out, seed=s + 3)
    pb = rnd(k_in, seed=s + 4) if bias else None
    ids = ids_for(n, e, s + 5)
    if e >= 4:
        ids[ids == 1] = -1  # an empty episode
    out = cuda_ops._segment_sketch(x, dy, pi, pb, po, ids, e, split=split)
    assert out.dtype == torch.float32 and out.shape == (e, k_out, k_in)
    ref = R.segment_sketch(x.double(), dy.double(), pi.double(), d64(pb), po.double(), ids, e)
    assert rel(out, ref) <= TOL[dtype]
    if e >= 4:
        assert torch.equal(out[1].cpu(), torch.zeros(k_out, k_in))


@needs_gpu
def test_segment_sketch_single_long_episode_and_all_skipped(poisoned):
    n = 3000
    x, dy, pi, po = rnd(n, 40, seed=1), rnd(n, 24, seed=2), rnd(8, 40, seed=3), rnd(6, 24, seed=4)
    ids = torch.zeros(n, dtype=torch.int64, device=DEVICE)
    ids[::7] = -1
    for split in (None, 1, 5, 16):
        out = cuda_ops._segment_sketch(x, dy, pi, None, po, ids, 1, split=split)
        ref = R.segment_sketch(x.double(), dy.double(), pi.double(), None, po.double(), ids, 1)
        assert rel(out, ref) <= 1e-5, split
    skipped = torch.full((n,), -1, dtype=torch.int64, device=DEVICE)
    out = cuda_ops.segment_sketch(x, dy, pi, None, po, skipped, 3)
    assert torch.equal(out.cpu(), torch.zeros(3, 6, 8))


@needs_gpu
def test_segment_sketch_bad_ids():
    x, dy, pi, po = rnd(5, 4), rnd(5, 3), rnd(2, 4), rnd(2, 3)
    sketch = ops.get("cuda").segment_sketch
    with pytest.raises(ValueError, match=r"token_episode must lie in \[-1, 2\)"):
        sketch(x, dy, pi, None, po, torch.tensor([0, 1, 2, 0, 0], device=DEVICE), 2)
    with pytest.raises(ValueError, match=r"token_episode must lie in \[-1, 2\)"):
        sketch(x, dy, pi, None, po, torch.tensor([0, -2, 1, 0, 0], device=DEVICE), 2)
    with pytest.raises(ValueError, match="integer"):
        sketch(x, dy, pi, None, po, torch.zeros(5, device=DEVICE), 2)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,e", [(1, 1), (10, 1), (1000, 7), (5000, 300), (100, 0)])
def test_segment_sum(poisoned, dtype, n, e):
    s = seed_of("segsum", n, e)
    v = rnd(n, dtype=dtype, seed=s)
    ids = ids_for(n, e, s + 1) if e else torch.full((n,), -1, dtype=torch.int64, device=DEVICE)
    out = cuda_ops.segment_sum(v, ids, e)
    assert out.dtype == dtype and out.shape == (e,)
    ref = R.segment_sum(v.double().cpu(), ids.cpu(), e)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert rel(out, ref) <= tol


@needs_gpu
def test_segment_sum_integers_are_exact():
    ids = torch.tensor([0, 1, -1, 0, 1, 2, 2, 2, -1, 0], device=DEVICE)
    for dtype in (torch.int64, torch.int32, torch.float32):
        v = torch.arange(10, device=DEVICE, dtype=dtype)
        out = cuda_ops.segment_sum(v, ids, 3)
        assert out.dtype == dtype and out.tolist() == [12, 5, 18]


# ---------------------------------------------------------------------------------------------
# select_episodes / score_and_select (GPU)

RULE_VALUES = [
    ("threshold", 0.0),
    ("threshold", 0.3),
    ("threshold", -1.5),
    ("bottom_fraction", 0.0),
    ("bottom_fraction", 0.29),
    ("bottom_fraction", 0.5),
    ("bottom_fraction", 1.0),
    ("negative_bottom_fraction", 0.25),
    ("negative_bottom_fraction", 0.7),
    ("negative_bottom_fraction", 1.0),
]


def check_select(scores: torch.Tensor, rule: str, value: float) -> None:
    keep, w = cuda_ops.select_episodes(scores, rule, value)
    rk, rw = R.select_episodes(scores.cpu(), rule, value)
    assert keep.dtype == torch.bool and keep.device == scores.device
    assert torch.equal(keep.cpu(), rk), (rule, value)
    assert w.dtype == scores.dtype
    # fp16/bf16: the reference rounds the mean to the scores' dtype, the kernel divides by the fp32 mean
    rtol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}[
        scores.dtype
    ]
    # equal_nan: a kept mean of exactly 0 gives 0/0 in both (the reference's "callers decide" case)
    torch.testing.assert_close(w.cpu(), rw, rtol=rtol, atol=rtol, equal_nan=True)


@needs_gpu
@pytest.mark.parametrize("rule,value", RULE_VALUES)
@pytest.mark.parametrize("e", [1, 2, 7, 100, 1000, 3001])
def test_select_episodes(poisoned, rule, value, e):
    check_select(rnd(e, seed=seed_of("sel", e)), rule, value)


@needs_gpu
@pytest.mark.parametrize("rule,value", RULE_VALUES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_select_episodes_dtypes(poisoned, rule, value, dtype):
    check_select(rnd(257, dtype=dtype, seed=3), rule, value)


@needs_gpu
@pytest.mark.parametrize("rule,value", RULE_VALUES)
def test_select_episodes_ties_and_signed_zeros(poisoned, rule, value):
    g = torch.Generator().manual_seed(7)
    ties = torch.randint(-3, 3, (600,), generator=g).float().to(DEVICE)  # many equal scores
    check_select(ties, rule, value)
    zeros = torch.tensor([0.0, -0.0, 1.0, -0.0, 0.0, -1.0, -0.0] * 40, device=DEVICE)
    check_select(zeros, rule, value)
    check_select(torch.full((33,), -2.0, device=DEVICE), rule, value)  # all equal


@needs_gpu
@pytest.mark.parametrize("rule,value", RULE_VALUES)
def test_select_episodes_all_negative(poisoned, rule, value):
    check_select(-rnd(300, seed=11).abs() - 0.1, rule, value)


@needs_gpu
def test_select_episodes_nan_inf_and_empty():
    for bad in (float("nan"), float("inf"), float("-inf")):
        s = rnd(500, seed=1)
        s[123] = bad
        s[400] = bad
        for rule, value in (("threshold", 0.0), ("bottom_fraction", 0.3)):
            with pytest.raises(ValueError, match=r"NaN/Inf \(first bad episode: 123"):
                cuda_ops.select_episodes(s, rule, value)
    keep, w = cuda_ops.select_episodes(torch.zeros(0, device=DEVICE), "bottom_fraction", 0.5)
    assert keep.shape == w.shape == (0,) and keep.dtype == torch.bool
    with pytest.raises(ValueError, match="unknown rule"):
        ops.get("cuda").select_episodes(rnd(4), "top", 0.5)
    with pytest.raises(ValueError, match="fraction"):
        ops.get("cuda").select_episodes(rnd(4), "bottom_fraction", 1.5)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rule,value", RULE_VALUES[::2])
@pytest.mark.parametrize("e,d", [(1, 1), (9, 300), (100, 64 * 48), (1000, 17)])
def test_score_and_select(poisoned, dtype, rule, value, e, d):
    s = seed_of("sas", e, d)
    sk, tg = rnd(e, d, dtype=dtype, seed=s), rnd(d, seed=s + 1)
    scores, keep, w = cuda_ops.score_and_select(sk, tg, rule, value)
    rs, _, _ = R.score_and_select(sk.double(), tg.double(), rule, value)
    assert scores.dtype == R.acc_dtype(dtype)
    assert rel(scores, rs) <= (1e-12 if dtype == torch.float64 else 1e-5)
    # the selection itself must be exactly the reference's on these scores
    rk, rw = R.select_episodes(scores.cpu(), rule, value)
    assert torch.equal(keep.cpu(), rk)
    torch.testing.assert_close(w.cpu(), rw, rtol=1e-5, atol=1e-6)


@needs_gpu
def test_score_and_select_nan_and_empty():
    sk = rnd(50, 40, seed=1)
    sk[17, 3] = float("nan")
    with pytest.raises(ValueError, match=r"first bad episode: 17"):
        cuda_ops.score_and_select(sk, rnd(40, seed=2), "bottom_fraction", 0.2)
    scores, keep, w = cuda_ops.score_and_select(torch.zeros(0, 8, device=DEVICE), rnd(8), "threshold", 0.0)
    assert scores.shape == keep.shape == w.shape == (0,)


# ---------------------------------------------------------------------------------------------
# determinism (GPU)


@needs_gpu
def test_bitwise_deterministic():
    n = 4000
    x, dy, g = (
        rnd(n, 96, seed=1, dtype=torch.bfloat16),
        rnd(n, 80, seed=2, dtype=torch.bfloat16),
        rnd(80, 96, seed=3),
    )
    pi, po, pb, w = rnd(70, 96, seed=4), rnd(70, 80, seed=5), rnd(70, seed=6), rnd(70, seed=7)
    ids = ids_for(n, 13, 8)

    def run():
        sk = cuda_ops.segment_sketch(x, dy, pi, pb, po, ids, 13)
        return (
            cuda_ops.exact_token_scores(x, dy, g),
            cuda_ops._exact_token_scores(x, dy, g, split=2),
            cuda_ops.projected_token_scores(x, dy, pi, pb, po, w),
            sk,
            cuda_ops._segment_sketch(x, dy, pi, pb, po, ids, 13, split=4),
            cuda_ops.segment_sum(rnd(n, seed=9), ids, 13),
            *cuda_ops.score_and_select(sk.flatten(1), rnd(70 * 70, seed=10), "bottom_fraction", 0.3),
        )

    first, second = run(), run()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
