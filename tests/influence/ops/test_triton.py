"""Triton kernels (``ippo.kernels`` via ``ippo.influence.ops.triton``) against the torch reference.

Runs on the CPU under ``TRITON_INTERPRET=1`` (set below, before triton is imported) and on a
CUDA GPU as is. Sizes are small (the interpreter runs programs one by one); the 16-wide
``SMALL`` block overrides force several tiles, token blocks and feature chunks on them.
fp32 results are compared with the reference computed in fp64: ``||out - ref|| / ||ref||``.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

_ROOT = Path(__file__).resolve().parents[3]
if str(_ROOT) not in sys.path:  # before `pip install -e .`, import ippo from the checkout
    sys.path.insert(0, str(_ROOT))

from ippo.influence import ops
from ippo.influence.ops import reference as R
from ippo.influence.ops import triton as T

K = T.K  # ippo.kernels (installed package, or the repo's kernels/ loaded under that name)
from ippo.kernels import _config

ON_GPU = _config.ON_GPU
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is not 1", allow_module_level=True)
DEV = torch.device("cuda" if ON_GPU else "cpu")

FP32_TOL = 1e-5
FP16_TOL = 2e-3
needs_gpu_bf16 = pytest.mark.skipif(not ON_GPU, reason="interpreter mishandles bf16")

SMALL = {
    "segment_sketch": {"BLOCK_T": 16, "BLOCK_KO": 16, "BLOCK_KI": 16, "BLOCK_D": 16},
    "exact_score": {"BLOCK_T": 16, "BLOCK_O": 16, "BLOCK_D": 16},
    "projected_score": {"BLOCK_T": 16, "BLOCK_Q": 16, "BLOCK_D": 16},
    "segment_sum": {"BLOCK_T": 16},
}


def rand(*shape, dtype=torch.float32):
    """Fresh random values, never all zeros."""
    return (torch.randn(*shape, dtype=torch.float64) + 0.1).to(DEV, dtype)


def f64(t):
    return None if t is None else t.to(torch.float64)


def rel_err(out, ref):
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite values in the output"
    ref = ref.to(torch.float64)
    denom = ref.norm()
    assert denom > 0, "degenerate reference (all zeros): the test could not fail"
    return ((out.to(torch.float64) - ref).norm() / denom).item()


def nan_like_out(*shape):
    return torch.full(shape, float("nan"), dtype=torch.float32, device=DEV)


def episode_ids(n, num_episodes, *, skip=True, empty=None):
    """Random, interleaved ids in [0, E) (-1 sprinkled in), leaving episode ``empty`` unused."""
    ids = torch.randint(0, num_episodes, (n,))
    if empty is not None and num_episodes > 1:
        ids[ids == empty] = (empty + 1) % num_episodes
    if skip and n > 2:
        ids[torch.randperm(n)[: max(1, n // 7)]] = -1
    return ids.to(DEV)


# ---------------------------------------------------------------- segment_sketch

# (N, d_in, d_out, k_in, k_out, E, bias)
SKETCH_SHAPES = [
    (1, 5, 5, 3, 3, 1, True),
    (7, 37, 40, 17, 3, 3, False),
    (70, 40, 37, 3, 17, 5, True),
    (70, 5, 37, 17, 17, 4, False),
    (33, 37, 5, 16, 32, 2, True),
]


@pytest.mark.parametrize("shape", SKETCH_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("config", ["small", "default"])
def test_segment_sketch_fp32(shape, config):
    n, d_in, d_out, k_in, k_out, num_e, has_bias = shape
    x, dy = rand(n, d_in), rand(n, d_out)
    p_in, p_out = rand(k_in, d_in), rand(k_out, d_out)
    bias = rand(k_in) if has_bias else None
    ids = episode_ids(n, num_e, empty=num_e - 1 if num_e > 2 else None)
    out = nan_like_out(num_e, k_out, k_in)
    ov = SMALL["segment_sketch"] if config == "small" else None
    got = K.segment_sketch(x, dy, p_in, bias, p_out, ids, num_e, overrides=ov, out=out)
    assert got.data_ptr() == out.data_ptr() and got.dtype == torch.float32
    ref = R.segment_sketch(f64(x), f64(dy), f64(p_in), f64(bias), f64(p_out), ids, num_e)
    assert rel_err(got, ref) <= FP32_TOL
    if num_e > 2:  # the unused episode is exactly zero (not NaN, not stale memory)
        assert torch.equal(got[num_e - 1], torch.zeros_like(got[num_e - 1]))


def test_segment_sketch_long_segment_and_split():
    """E=1, one segment several BLOCK_T long, interleaved -1s; forced chunking over the segment."""
    n, d_in, d_out, k_in, k_out = 70, 20, 18, 17, 5
    x, dy = rand(n, d_in), rand(n, d_out)
    p_in, p_out, bias = rand(k_in, d_in), rand(k_out, d_out), rand(k_in)
    ids = torch.zeros(n, dtype=torch.int64, device=DEV)
    ids[::9] = -1
    ref = R.segment_sketch(f64(x), f64(dy), f64(p_in), f64(bias), f64(p_out), ids, 1)
    ov = SMALL["segment_sketch"]
    for split in (1, 2, 3, 8):  # 8 chunks of 16 rows > 61 kept tokens: some chunks are empty
        got = K.segment_sketch(x, dy, p_in, bias, p_out, ids, 1, split=split, overrides=ov)
        assert rel_err(got, ref) <= FP32_TOL, split


def test_segment_sketch_split_with_empty_and_skewed_episodes():
    n, num_e = 60, 4
    x, dy = rand(n, 9), rand(n, 21)
    p_in, p_out = rand(4, 9), rand(19, 21)
    ids = torch.full((n,), 2, dtype=torch.int64)
    ids[:3] = 0
    ids[-5:] = -1
    ids = ids[torch.randperm(n)].to(DEV)  # episode 1 and 3 empty, episode 2 long, interleaved
    ref = R.segment_sketch(f64(x), f64(dy), f64(p_in), None, f64(p_out), ids, num_e)
    got = K.segment_sketch(x, dy, p_in, None, p_out, ids, num_e, split=3, overrides=SMALL["segment_sketch"])
    assert rel_err(got, ref) <= FP32_TOL
    assert torch.equal(got[1], torch.zeros_like(got[1])) and torch.equal(got[3], torch.zeros_like(got[3]))


def test_segment_sketch_deterministic_and_order_independent():
    """Bitwise equal run to run; permuting the tokens only changes the summation order."""
    n, num_e = 50, 3
    x, dy, p_in, p_out, bias = rand(n, 12), rand(n, 13), rand(5, 12), rand(6, 13), rand(5)
    ids = episode_ids(n, num_e)
    ov = SMALL["segment_sketch"]
    a = T.segment_sketch(x, dy, p_in, bias, p_out, ids, num_e)
    b = T.segment_sketch(x, dy, p_in, bias, p_out, ids, num_e)
    assert torch.equal(a, b)
    perm = torch.randperm(n, device=DEV)
    c = K.segment_sketch(x[perm], dy[perm], p_in, bias, p_out, ids[perm], num_e, overrides=ov)
    assert rel_err(c, a) <= FP32_TOL


def test_segment_sketch_fp16():
    n, num_e = 70, 3
    x, dy = rand(n, 37, dtype=torch.float16), rand(n, 40, dtype=torch.float16)
    p_in, p_out = rand(17, 37, dtype=torch.float16), rand(3, 40, dtype=torch.float16)
    bias = rand(17, dtype=torch.float16)
    ids = episode_ids(n, num_e)
    got = T.segment_sketch(x, dy, p_in, bias, p_out, ids, num_e)
    assert got.dtype == torch.float32
    ref = R.segment_sketch(f64(x), f64(dy), f64(p_in), f64(bias), f64(p_out), ids, num_e)
    assert rel_err(got, ref) <= FP16_TOL


@needs_gpu_bf16
def test_segment_sketch_bf16():
    n, num_e = 300, 5
    x, dy = rand(n, 100, dtype=torch.bfloat16), rand(n, 70, dtype=torch.bfloat16)
    p_in, p_out = rand(33, 100, dtype=torch.bfloat16), rand(17, 70, dtype=torch.bfloat16)
    ids = episode_ids(n, num_e)
    got = T.segment_sketch(x, dy, p_in, None, p_out, ids, num_e)
    ref = R.segment_sketch(f64(x), f64(dy), f64(p_in), None, f64(p_out), ids, num_e)
    assert rel_err(got, ref) <= FP16_TOL


def test_segment_sketch_degenerate_shapes():
    x, dy, p_in, p_out = rand(6, 5), rand(6, 4), rand(3, 5), rand(3, 4)
    all_skipped = torch.full((6,), -1, dtype=torch.int64, device=DEV)
    got = T.segment_sketch(x, dy, p_in, None, p_out, all_skipped, 2)
    assert torch.equal(got, torch.zeros(2, 3, 3, device=DEV))
    got = T.segment_sketch(x[:0], dy[:0], p_in, None, p_out, all_skipped[:0], 2)  # N = 0
    assert torch.equal(got, torch.zeros(2, 3, 3, device=DEV))
    assert T.segment_sketch(x, dy, p_in, None, p_out, all_skipped, 0).shape == (0, 3, 3)


def test_segment_sketch_fp64_falls_back_to_reference():
    x, dy, p_in, p_out = (t.double() for t in (rand(9, 5), rand(9, 4), rand(3, 5), rand(2, 4)))
    ids = episode_ids(9, 2)
    got = T.segment_sketch(x, dy, p_in, None, p_out, ids, 2)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, R.segment_sketch(x, dy, p_in, None, p_out, ids, 2))


def test_segment_sketch_rejects_bad_inputs():
    """Through ``ops.get``: the contract (every op on every backend: test_contract.py); ``out`` is the launcher's."""
    x, dy, p_in, p_out = rand(6, 5), rand(6, 4), rand(3, 5), rand(3, 4)
    ids = torch.zeros(6, dtype=torch.int64, device=DEV)
    sketch = ops.get("triton").segment_sketch
    with pytest.raises(ValueError, match=r"token_episode must lie in \[-1, 2\)"):
        sketch(x, dy, p_in, None, p_out, ids + 2, 2)
    with pytest.raises(ValueError, match=r"token_episode must lie in \[-1, 2\)"):
        sketch(x, dy, p_in, None, p_out, ids - 2, 2)
    with pytest.raises(ValueError, match="token_episode must be an integer tensor"):
        sketch(x, dy, p_in, None, p_out, ids.float(), 2)
    with pytest.raises(ValueError, match=r"p_in\.shape\[1\]"):
        sketch(x, dy, p_in.T, None, p_out, ids, 2)
    with pytest.raises(ValueError, match=r"dy\.shape\[0\] \(number of tokens N, from x\)"):
        sketch(x, dy[:5], p_in, None, p_out, ids, 2)
    with pytest.raises(ValueError, match="p_in_bias length"):
        sketch(x, dy, p_in, rand(4), p_out, ids, 2)
    with pytest.raises(ValueError, match="out must be"):
        K.segment_sketch(x, dy, p_in, None, p_out, ids, 2, out=torch.empty(2, 3, 4, device=DEV))


# ---------------------------------------------------------------- exact_token_scores

# (N, d_in, d_out, bias)
EXACT_SHAPES = [(1, 5, 5, True), (7, 37, 40, False), (70, 40, 37, True), (33, 5, 70, False)]


@pytest.mark.parametrize("shape", EXACT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("config", ["small", "default"])
def test_exact_token_scores_fp32(shape, config):
    n, d_in, d_out, has_bias = shape
    x, dy, g = rand(n, d_in), rand(n, d_out), rand(d_out, d_in)
    g_bias = rand(d_out) if has_bias else None
    out = nan_like_out(n)
    ov = SMALL["exact_score"] if config == "small" else None
    got = K.exact_token_scores(x, dy, g, g_bias, overrides=ov, out=out)
    assert got.data_ptr() == out.data_ptr()
    ref = R.exact_token_scores(f64(x), f64(dy), f64(g), f64(g_bias))
    assert rel_err(got, ref) <= FP32_TOL


@pytest.mark.parametrize("split", [2, 3, 7])
def test_exact_token_scores_split_d_out(split):
    """Partials over d_out tiles combined in fixed order (the GPU small-N path)."""
    x, dy, g, g_bias = rand(20, 19), rand(20, 70), rand(70, 19), rand(70)
    ref = R.exact_token_scores(f64(x), f64(dy), f64(g), f64(g_bias))
    got = K.exact_token_scores(x, dy, g, g_bias, split=split, overrides=SMALL["exact_score"])
    assert rel_err(got, ref) <= FP32_TOL


def test_exact_token_scores_noncontiguous_and_fp16():
    x = rand(40, 37).T.contiguous().T  # column-major
    dy, g = rand(80, 40)[::2], rand(37, 40).T  # strided rows, transposed G
    ref = R.exact_token_scores(f64(x), f64(dy), f64(g))
    assert rel_err(T.exact_token_scores(x, dy, g), ref) <= FP32_TOL
    xh, dyh, gh, bh = (t.half() for t in (x, dy, g, rand(40)))
    got = T.exact_token_scores(xh, dyh, gh, bh)
    assert got.dtype == torch.float32
    assert rel_err(got, R.exact_token_scores(f64(xh), f64(dyh), f64(gh), f64(bh))) <= FP16_TOL


@needs_gpu_bf16
def test_exact_token_scores_bf16():
    x, dy, g = (rand(*s, dtype=torch.bfloat16) for s in ((300, 100), (300, 70), (70, 100)))
    got = T.exact_token_scores(x, dy, g)
    assert rel_err(got, R.exact_token_scores(f64(x), f64(dy), f64(g))) <= FP16_TOL


def test_exact_token_scores_segment_sum_matches_episode_inner_product():
    """Summed over an episode, s_t is <G_e, G> + <b_e, b> with G_e = sum_t g_t x_t^T."""
    n, num_e = 30, 3
    x, dy, g, gb = rand(n, 11), rand(n, 9), rand(9, 11), rand(9)
    ids = episode_ids(n, num_e)
    per_ep = T.segment_sum(T.exact_token_scores(x, dy, g, gb), ids, num_e)
    want = torch.stack(
        [
            (f64(dy)[ids == e].T @ f64(x)[ids == e] * f64(g)).sum() + f64(dy)[ids == e].sum(0) @ f64(gb)
            for e in range(num_e)
        ]
    )
    assert rel_err(per_ep, want) <= FP32_TOL


def test_exact_token_scores_fp64_and_validation():
    x, dy, g = rand(5, 4).double(), rand(5, 3).double(), rand(3, 4).double()
    got = T.exact_token_scores(x, dy, g)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, R.exact_token_scores(x, dy, g))
    exact = ops.get("triton").exact_token_scores
    with pytest.raises(ValueError, match=r"g\.shape\[0\]"):
        exact(x.float(), dy.float(), g.float().T)
    with pytest.raises(ValueError, match="g_bias length"):
        exact(x.float(), dy.float(), g.float(), rand(4))
    with pytest.raises(ValueError, match="x must be a floating tensor"):
        exact(x.int(), dy.float(), g.float())
    assert T.exact_token_scores(x[:0].float(), dy[:0].float(), g.float()).shape == (0,)


# ---------------------------------------------------------------- projected_token_scores

# (N, d_in, d_out, q, bias)
PROJ_SHAPES = [(1, 5, 5, 3, True), (7, 37, 40, 17, False), (70, 40, 37, 3, True), (33, 70, 5, 17, True)]


@pytest.mark.parametrize("shape", PROJ_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("config", ["small", "default"])
def test_projected_token_scores_fp32(shape, config):
    n, d_in, d_out, q, has_bias = shape
    x, dy, p_in, p_out, w = rand(n, d_in), rand(n, d_out), rand(q, d_in), rand(q, d_out), rand(q)
    bias = rand(q) if has_bias else None
    out = nan_like_out(n)
    ov = SMALL["projected_score"] if config == "small" else None
    got = K.projected_token_scores(x, dy, p_in, bias, p_out, w, overrides=ov, out=out)
    assert got.data_ptr() == out.data_ptr()
    ref = R.projected_token_scores(f64(x), f64(dy), f64(p_in), f64(bias), f64(p_out), f64(w))
    assert rel_err(got, ref) <= FP32_TOL


def test_projected_token_scores_fp16_fp64_validation():
    x, dy, p_in, p_out, w, b = rand(40, 37), rand(40, 20), rand(17, 37), rand(17, 20), rand(17), rand(17)
    h = [t.half() for t in (x, dy, p_in, b, p_out, w)]
    got = T.projected_token_scores(*h)
    assert got.dtype == torch.float32
    assert rel_err(got, R.projected_token_scores(*(f64(t) for t in h))) <= FP16_TOL
    d = [t.double() for t in (x, dy, p_in, b, p_out, w)]
    torch.testing.assert_close(T.projected_token_scores(*d), R.projected_token_scores(*d))
    with pytest.raises(ValueError, match=r"p_out\.shape\[0\]"):
        ops.get("triton").projected_token_scores(x, dy, p_in, b, p_out[:3], w)
    with pytest.raises(ValueError, match="weight length"):
        ops.get("triton").projected_token_scores(x, dy, p_in, b, p_out, w[:3])


@needs_gpu_bf16
def test_projected_token_scores_bf16():
    t = [rand(*s, dtype=torch.bfloat16) for s in ((300, 100), (300, 70), (33, 100), (33,), (33, 70), (33,))]
    got = T.projected_token_scores(*t)
    assert rel_err(got, R.projected_token_scores(*(f64(v) for v in t))) <= FP16_TOL


def test_projected_scores_sum_equals_sketch_contraction():
    """With k_in = k_out = q, sum_{t in e} s_t = <S_e, diag(w)>: the two kernels agree."""
    n, num_e, q = 45, 3, 17
    x, dy, p_in, p_out, w, b = rand(n, 13), rand(n, 11), rand(q, 13), rand(q, 11), rand(q), rand(q)
    ids = episode_ids(n, num_e)
    per_ep = T.segment_sum(T.projected_token_scores(x, dy, p_in, b, p_out, w), ids, num_e)
    sketch = T.segment_sketch(x, dy, p_in, b, p_out, ids, num_e)
    assert rel_err(per_ep, torch.diagonal(sketch.double(), dim1=1, dim2=2) @ f64(w)) <= FP32_TOL


# ---------------------------------------------------------------- segment_sum, dispatch, config


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_segment_sum(dtype):
    n, num_e = 70, 6
    v = rand(n, dtype=dtype)
    ids = episode_ids(n, num_e, empty=2)
    ref = R.segment_sum(f64(v), ids, num_e)
    got = K.segment_sum(v, ids, num_e, overrides=SMALL["segment_sum"])
    assert got.dtype == dtype
    assert rel_err(got, ref) <= FP32_TOL
    assert got[2] == 0
    assert torch.equal(T.segment_sum(v, ids, num_e), T.segment_sum(v, ids, num_e))
    strided = rand(2 * n, dtype=dtype)[::2]
    assert rel_err(T.segment_sum(strided, ids, num_e), R.segment_sum(f64(strided), ids, num_e)) <= FP32_TOL


def test_sort_by_episode():
    ids = torch.tensor([2, -1, 0, 2, 0, -1, 2], device=DEV)
    order, offsets = K.sort_by_episode(ids, 4)
    assert order.tolist() == [2, 4, 0, 3, 6]
    assert offsets.tolist() == [0, 2, 2, 5, 5]


def test_dispatch_uses_the_triton_ops():
    """``ops.get("triton")`` checks the arguments (contract.py), then runs these."""
    ns = ops.get("triton")
    for name in ("exact_token_scores", "projected_token_scores", "segment_sketch", "segment_sum"):
        assert getattr(ns, name).__wrapped__ is getattr(T, name), name
    assert ns.select_episodes.__wrapped__ is R.select_episodes
    assert ns.score_and_select.__wrapped__ is R.score_and_select


def test_launch_config_policy():
    import triton

    kernels = [
        K.segment_sketch.__globals__["_segment_sketch_kernel"],
        K.exact_token_scores.__globals__["_exact_score_kernel"],
        K.projected_token_scores.__globals__["_projected_score_kernel"],
    ]
    autotuned = [isinstance(k, triton.runtime.Autotuner) for k in kernels]
    assert autotuned == [ON_GPU] * 3  # autotune on a GPU only
    for name, cfg in _config.CPU_CONFIGS.items():
        if name != "segment_sum":  # every block that feeds tl.dot is >= 16 (GPU requirement)
            assert all(v >= 16 and v & (v - 1) == 0 for v in cfg.values()), (name, cfg)
    with pytest.raises(ValueError, match="unknown launch overrides"):
        K.projected_token_scores(
            rand(3, 4), rand(3, 4), rand(2, 4), None, rand(2, 4), rand(2), overrides={"X": 1}
        )
