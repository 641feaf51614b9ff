"""Target.basis: the rank-q SVD behind mode="target", computed once per layer shape (batched).

The reference is the per-layer algorithm written out plainly (randomized range finder with one
power iteration, Householder QR, LAPACK SVD, the same name-seeded omega per layer). Singular
vectors are compared through sign-free quantities: sigma, the rank-k reconstruction and the
projected scores.
"""

from __future__ import annotations

import pytest
import torch

from ippo.influence.lowrank import SVD_OVERSAMPLE, SVD_POWER_ITERS, LayerFactors, truncated_svd
from ippo.influence.ops import reference as ref
from ippo.influence.projections import gaussian
from ippo.influence.target import Target

Q = 16  # width 32: layers with min(d_out, d_in + bias) > 64 take the randomized branch

# name -> (d_out, d_in, bias); three layers share a shape (one of them with a bias, so its own
# group), two more shapes take the randomized branch, the last the full-SVD branch.
LAYERS = {
    "blk.0.q": (96, 80, False),
    "blk.0.k": (96, 80, False),
    "blk.1.q": (96, 80, False),
    "blk.1.b": (96, 80, True),
    "mlp.up.0": (160, 96, False),
    "mlp.up.1": (160, 96, False),
    "mlp.down": (80, 200, False),
    "tiny": (40, 30, True),
}


def _spectrum_target(dtype, decay: float = 0.93, seed: int = 0) -> Target:
    """Random layers G = U diag(decay^j) V^T (+ bias), so the top-Q subspace is well defined."""
    gen = torch.Generator().manual_seed(seed)
    weights, biases = {}, {}
    for name, (d_out, d_in, bias) in LAYERS.items():
        d_aug = d_in + bias
        r = min(d_out, d_aug)
        u = torch.linalg.qr(torch.randn(d_out, r, generator=gen, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(d_aug, r, generator=gen, dtype=torch.float64)).Q
        s = decay ** torch.arange(r, dtype=torch.float64) * (1 + torch.rand(1, generator=gen, dtype=torch.float64))
        g = ((u * s) @ v.T).to(dtype)
        weights[name] = g[:, :d_in].contiguous()
        biases[name] = g[:, d_in].contiguous() if bias else None
    return Target(weights, biases)


def _reference_svd(name: str, g: torch.Tensor, q: int):
    """The per-layer algorithm (float64): u [d_out, k], s [k], vh [k, d_aug]."""
    g = g.double()
    d_out, d_aug = g.shape
    k = min(q, d_out, d_aug)
    width = min(k + SVD_OVERSAMPLE, d_out, d_aug)
    if min(d_out, d_aug) <= 2 * width:
        u, s, vh = torch.linalg.svd(g, full_matrices=False)
    else:
        basis = torch.linalg.qr(g @ gaussian(d_aug, width, "svd", name)).Q
        for _ in range(SVD_POWER_ITERS):
            basis = torch.linalg.qr(g @ torch.linalg.qr(g.T @ basis).Q).Q
        v, s, ubt = torch.linalg.svd(g.T @ basis, full_matrices=False)
        u, vh = basis @ ubt.T, v.T
    return u[:, :k], s[:k], vh[:k]


def _reconstruction(entry) -> torch.Tensor:
    p_in, p_in_bias, p_out, s = (t if t is None else t.double() for t in entry)
    vh = p_in if p_in_bias is None else torch.cat([p_in, p_in_bias[:, None]], 1)
    return (p_out.T * s) @ vh


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float64, 1e-10)])
def test_batched_basis_equals_per_layer(dtype, tol):
    target = _spectrum_target(dtype)
    basis = target.basis(Q)
    assert list(basis) == list(LAYERS)
    for name, (d_out, d_in, bias) in LAYERS.items():
        g = target._augmented(name)
        p_in, p_in_bias, p_out, s = basis[name]
        k = min(Q, d_out, d_in + bias)
        assert p_in.shape == (k, d_in) and p_out.shape == (k, d_out) and s.shape == (k,)
        assert (p_in_bias is not None) == bias and (not bias or p_in_bias.shape == (k,))
        assert all(t is None or (t.dtype == dtype and t.is_contiguous()) for t in basis[name])
        u, s_ref, vh = _reference_svd(name, g, Q)
        assert _rel(s, s_ref) < tol, name
        assert _rel(_reconstruction(basis[name]), (u * s_ref) @ vh) < tol, name
        # one layer alone (a batch of one) gives the same basis as inside its shape group
        alone = truncated_svd(name, g, Q, bias)
        assert _rel(_reconstruction(alone), _reconstruction(basis[name])) < tol, name
        eye = torch.eye(k, dtype=torch.float64)
        assert (p_out.double() @ p_out.double().T - eye).abs().max() < 50 * tol, name  # U^T U = I
        vh_aug = _reconstruction((p_in, p_in_bias, eye.to(dtype)[:, :k], torch.ones(k, dtype=dtype)))
        assert (vh_aug @ vh_aug.T - eye).abs().max() < 50 * tol, name  # V^T V = I


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_basis_as_accurate_as_float64_reference(dtype):
    """A steep spectrum (0.8^j: sigma_q / sigma_1 ~ 3e-2, sigma_width / sigma_1 ~ 1e-3) stresses the
    Cholesky-QR and Gram-eigendecomposition steps; they must stay at float32 rounding."""
    target = _spectrum_target(dtype, decay=0.8, seed=1)
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    for name, entry in target.basis(Q).items():
        u, s, vh = _reference_svd(name, target._augmented(name), Q)
        assert _rel(_reconstruction(entry), (u * s) @ vh) < tol, name


def test_basis_scores_match_per_layer_scores():
    """What mode="target" consumes: the projected token scores of the batched basis equal those of
    the per-layer reference basis to float32 rounding."""
    target = _spectrum_target(torch.float32, seed=2)
    gen = torch.Generator().manual_seed(3)
    for name, entry in target.basis(Q).items():
        d_out, d_in, bias = LAYERS[name]
        x, dy = torch.randn(64, d_in, generator=gen), torch.randn(64, d_out, generator=gen)
        u, s, vh = _reference_svd(name, target._augmented(name), Q)
        p_in_bias = vh[:, -1] if bias else None
        want = ref.projected_token_scores(x.double(), dy.double(), vh[:, :d_in], p_in_bias, u.T, s)
        got = ref.projected_token_scores(x, dy, *entry)
        assert float((got.double() - want).abs().max() / want.abs().max()) < 2e-5, name


@pytest.mark.parametrize("rank", [0, 5, 40])
def test_rank_deficient_layers_exact_and_orthonormal(rank):
    """rank(G) < width: the Cholesky-QR / Gram route cannot be trusted (a singular Gram matrix); the
    basis falls back to Householder QR and LAPACK's SVD and stays exact and orthonormal."""
    gen = torch.Generator().manual_seed(4)
    d_out, d_in = 300, 260  # min(d) > 2 * width even at q = 48: the randomized branch
    weights = {}
    for i in range(3):
        a = torch.randn(d_out, rank, generator=gen, dtype=torch.float64)
        weights[f"l{i}"] = (a @ torch.randn(rank, d_in, generator=gen, dtype=torch.float64)).float()
    target = Target(weights, {n: None for n in weights})
    q = max(rank, 1) if rank < 40 else 48  # q >= rank: the truncation is exact
    for name, entry in target.basis(q).items():
        assert all(torch.isfinite(t).all() for t in entry if t is not None), name
        g = weights[name].double()
        err = (_reconstruction(entry) - g).norm() / max(float(g.norm()), 1e-30)
        assert err < 1e-5, (name, float(err))
        p_in, _, p_out, _ = entry
        k = p_in.shape[0]
        assert (p_out.double() @ p_out.double().T - torch.eye(k, dtype=torch.float64)).abs().max() < 1e-4
        assert (p_in.double() @ p_in.double().T - torch.eye(k, dtype=torch.float64)).abs().max() < 1e-4


def test_basis_omegas_cached_and_shared():
    """The seeded test matrices are cached (in the engine's dict when the engine made the target);
    a fresh Target draws the same ones, so the bases agree."""
    a, b = _spectrum_target(torch.float32), _spectrum_target(torch.float32)
    shared: dict = {}
    a._omegas = shared
    first = a.basis(Q)
    assert len(shared) == sum(min(d_out, d_in + b) > 2 * (Q + SVD_OVERSAMPLE) for d_out, d_in, b in LAYERS.values())
    a._bases.clear()
    second = a.basis(Q)
    other = b.basis(Q)
    for name in LAYERS:
        for x, y, z in zip(first[name], second[name], other[name]):
            if x is not None:
                assert torch.equal(x, y) and torch.equal(x, z), name


# ---------------------------------------------------------------------------- the basis from factors
def _random_factors(dtype, n_tokens: int, seed: int = 5, rank: int | None = None) -> dict[str, LayerFactors]:
    """Validation factors (X, dY) for every layer of LAYERS, in two chunks (two validation batches).

    Column scales decay so that G = dY^T [X | 1] has a decaying spectrum; ``rank`` caps rank(G) by
    drawing dY = C M with C [N, rank] (then rank(G) <= rank whatever N is)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (d_out, d_in, bias) in LAYERS.items():
        x = torch.randn(n_tokens, d_in, generator=gen, dtype=torch.float64) * 0.97 ** torch.arange(d_in)
        if rank is None:
            dy = torch.randn(n_tokens, d_out, generator=gen, dtype=torch.float64) * 0.95 ** torch.arange(d_out)
        else:
            dy = (torch.randn(n_tokens, rank, generator=gen, dtype=torch.float64)
                  @ torch.randn(rank, d_out, generator=gen, dtype=torch.float64))
        f = LayerFactors(d_in, d_out, bias, dtype, torch.device("cpu"))
        half = n_tokens // 2
        f.append(x[:half].to(dtype), dy[:half].to(dtype))
        f.append(x[half:].to(dtype), dy[half:].to(dtype))
        out[name] = f
    return out


def _dense_of(factors: dict[str, LayerFactors]) -> dict[str, torch.Tensor]:
    """G_aug = sum_c dY_c^T [X_c | 1] in float64, written out plainly."""
    out = {}
    for name, f in factors.items():
        x = torch.cat(f.xs).double()
        if f.has_bias:
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
        out[name] = torch.cat(f.dys).double().T @ x
    return out


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float64, 1e-10)])
def test_factor_basis_equals_per_layer_reference_on_g(dtype, tol):
    """The basis built from (X, dY) is the reference algorithm run on the dense G = dY^T [X | 1]
    (same name-seeded omegas): sigma and the rank-k reconstruction agree to rounding, both branches."""
    factors = _random_factors(dtype, n_tokens=300)
    target = Target(factors=factors)
    assert target.kind == "factor"
    dense = _dense_of(factors)
    basis = target.basis(Q)
    assert list(basis) == list(LAYERS) and target._weights is None  # G was never formed
    for name, (d_out, d_in, bias) in LAYERS.items():
        p_in, p_in_bias, p_out, s = basis[name]
        k = min(Q, d_out, d_in + bias)
        assert p_in.shape == (k, d_in) and p_out.shape == (k, d_out) and (p_in_bias is not None) == bias
        assert all(t is None or (t.dtype == dtype and t.is_contiguous()) for t in basis[name])
        u, s_ref, vh = _reference_svd(name, dense[name], Q)
        assert _rel(s, s_ref) < tol, name
        assert _rel(_reconstruction(basis[name]), (u * s_ref) @ vh) < tol, name
    # the same target held dense gives the same basis
    dense_target = Target({n: g[:, :LAYERS[n][1]].to(dtype) for n, g in dense.items()},
                          {n: g[:, -1].to(dtype) if LAYERS[n][2] else None for n, g in dense.items()})
    for name, entry in dense_target.basis(Q).items():
        assert _rel(_reconstruction(basis[name]), _reconstruction(entry)) < tol, name


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("n_tokens, rank", [(12, None), (400, 10)], ids=["few-tokens", "low-rank-dY"])
def test_factor_basis_exact_when_rank_covers_g(dtype, tol, n_tokens, rank):
    """rank(G) <= q (12 validation tokens, or dY of rank 10 over 400 tokens): the rank-q basis
    reconstructs G exactly and the projected token scores equal the exact ones."""
    factors = _random_factors(dtype, n_tokens=n_tokens, rank=rank, seed=6)
    dense = _dense_of(factors)
    target = Target(factors=factors)
    gen = torch.Generator().manual_seed(7)
    for name, entry in target.basis(Q).items():
        d_out, d_in, bias = LAYERS[name]
        assert _rel(_reconstruction(entry), dense[name]) < tol, name
        x, dy = torch.randn(64, d_in, generator=gen, dtype=dtype), torch.randn(64, d_out, generator=gen, dtype=dtype)
        g = dense[name]
        exact = ref.exact_token_scores(x.double(), dy.double(), g[:, :d_in], g[:, -1] if bias else None)
        got = ref.projected_token_scores(x, dy, *entry)
        assert float((got.double() - exact).abs().max() / exact.abs().max()) < 10 * tol, name


def test_factor_target_dense_views_add_and_drop():
    """weights/biases of a factor target equal dY^T X (formed on demand); add_ of two chunks equals
    one target over both; after drop_factors the computed bases stay and anything else raises."""
    factors = _random_factors(torch.float64, n_tokens=40, seed=8)
    dense = _dense_of(factors)
    first = Target(factors={n: LayerFactors(f.d_in, f.d_out, f.has_bias, f.dtype, f.device, f.xs[:1], f.dys[:1])
                            for n, f in factors.items()}, num_tokens=20)
    second = Target(factors={n: LayerFactors(f.d_in, f.d_out, f.has_bias, f.dtype, f.device, f.xs[1:], f.dys[1:])
                             for n, f in factors.items()}, num_tokens=20)
    first.add_(second)
    assert first.num_tokens == 40 and all(len(f.xs) == 2 for f in first.factors.values())
    for name, (_, d_in, bias) in LAYERS.items():
        torch.testing.assert_close(first.weights[name], dense[name][:, :d_in], rtol=1e-12, atol=1e-12)
        assert (first.biases[name] is None) == (not bias)
        if bias:
            torch.testing.assert_close(first.biases[name], dense[name][:, -1], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="factor Target"):
        first.add_(Target(dict(first.weights), dict(first.biases)))
    basis = first.basis(Q)
    assert first.memory_bytes() > 0
    first.drop_factors()
    assert first.kind == "factor" and first.basis(Q) is basis and "tiny" in first
    with pytest.raises(RuntimeError, match="rank-4 basis"):
        first.basis(4)
    fresh = Target(factors=_random_factors(torch.float64, n_tokens=40, seed=8)).drop_factors()
    with pytest.raises(RuntimeError, match="dropped"):
        _ = fresh.weights
    with pytest.raises(ValueError, match="either the dense gradient"):
        Target()


def test_factor_basis_memory_never_holds_g():
    """The factor target's own memory: the factors plus O(q (d_in + d_out)) per layer; the dense
    target holds G. Layers sharing one input (q/k/v) share its storage."""
    gen = torch.Generator().manual_seed(9)
    n, d = 48, 400
    x = torch.randn(n, d, generator=gen)
    f = {name: LayerFactors(d, d, False, torch.float32, torch.device("cpu"), [x], [torch.randn(n, d, generator=gen)])
         for name in ("q", "k", "v")}
    target = Target(factors=f)
    target.basis(Q)
    width = Q
    expected = 4 * (n * d + 3 * n * d) + 3 * 4 * width * (2 * d + 1)  # X once, three dY, three bases
    assert target.memory_bytes() == expected
    assert target._weights is None
    assert target.drop_factors().memory_bytes() == 3 * 4 * width * (2 * d + 1)
