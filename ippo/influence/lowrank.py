"""Rank-q bases of a validation gradient G: randomized SVDs of a dense G, or of G given as factors.

The numerics behind ``Target.basis`` (``target.py``). ``mode="target"`` scores against
``G ~ U S V^T`` (rank q). Two ways to get it:

* ``group_svd``: from the dense ``G [d_out, d_in(+1)]`` of each layer (4 bytes per hooked parameter).
* ``factor_basis``: from the validation factors ``G = dY^T [X | 1]`` (``LayerFactors``), never
  forming G: the randomized range finder only needs ``G Omega = dY^T (X Omega)`` and
  ``G^T Psi = [X | 1]^T (dY Psi)``, so its memory is O(q (d_in + d_out)) per layer on top of the
  factors. The products are sums over tokens, so a distributed run sums each sketch over the ranks
  (``Collective``) and every rank then takes the same small factorisations.

Both run the same algorithm (name-seeded omegas, one power iteration, the same orthonormalisation
and small SVD, batched over the layers of one shape) and agree to rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .projections import gaussian

SVD_OVERSAMPLE = 16
SVD_POWER_ITERS = 1  # 1 vs 2: same Spearman with exact (0.9999) and max error on a 256-wide Llama, 20% less time


def truncated_svd(name: str, g: torch.Tensor, q: int, has_bias: bool, omegas: dict | None = None):
    """Top-q singular triplets of one layer's g [d_out, d_in(+1)] (``group_svd`` with one layer)."""
    return group_svd([name], g[None], q, [has_bias], {} if omegas is None else omegas)[name]


def group_svd(names: list[str], g: torch.Tensor, q: int, has_bias: list[bool], omegas: dict) -> dict:
    """Top-q singular triplets of a stack of same-shape layers g [L, d_out, d_in(+1)]; exact whenever
    rank(g) <= q. Returns name -> (p_in, p_in_bias, p_out, sigma) as ``Target.basis`` documents.

    Small layers get a full SVD (of the tall orientation: LAPACK is much slower on wide
    matrices). Larger ones get a randomized range finder with power iterations (Halko et al.),
    seeded by the layer name: its subspace is exact when rank(g) <= q + oversample, and the
    power iterations make it near-exact otherwise, for O(d_out * d_in * q) work instead of an
    O(d_out * d_in * min(d)) SVD (a 135M model's 211 layers: ~1 s instead of ~100 s here).
    One call per shape: the GEMMs and the small factorisations run batched over the layers, each
    layer with its own seeded omega, so a layer's basis does not depend on which others share it.
    """
    d_out, d_aug = g.shape[1:]
    k = min(q, d_out, d_aug)
    width = min(k + SVD_OVERSAMPLE, d_out, d_aug)
    if min(d_out, d_aug) <= 2 * width:
        if d_out >= d_aug:
            u, s, vh = torch.linalg.svd(g, full_matrices=False)
        else:
            v, s, uh = torch.linalg.svd(g.mT, full_matrices=False)
            u, vh = uh.mT, v.mT
        u, s, vh = u[..., :k], s[..., :k], vh[..., :k, :]
    else:
        y = g @ _svd_omega(names, d_aug, width, g.dtype, g.device, omegas)
        for _ in range(SVD_POWER_ITERS):
            y = g @ _orthonormal(g.mT @ _orthonormal(y))
        basis = _orthonormal(y, final=True)
        vh, s, ub = _tall_svd(g.mT @ basis, k)  # the tall g^T Q: LAPACK is ~2x slower on the wide Q^T g
        u = (ub.mT @ basis.mT).mT  # [L, d_out, k] with U^T contiguous, as the kernels take it
    return _pack(names, has_bias, u, s, vh)


def _pack(names: list[str], has_bias: list[bool], u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> dict:
    """u [L, d_out, k], s [L, k], vh [L, k, d_aug] -> name -> (p_in, p_in_bias, p_out, sigma)."""
    uh, s = _compact(u.mT.contiguous()), _compact(s)  # a no-op when u came out of a GEMM as its transpose
    out = {}
    for i, name in enumerate(names):
        if has_bias[i]:
            out[name] = (vh[i, :, :-1].contiguous(), vh[i, :, -1].contiguous(), uh[i], s[i])
        else:
            out[name] = (_compact(vh[i].contiguous()), None, uh[i], s[i])
    return out


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a copy when it is a slice of a larger buffer (a full SVD's U or S cut to k):
    the basis is kept for the whole iteration, and it should not keep the untruncated factors alive."""
    return t.clone() if t.untyped_storage().nbytes() > t.numel() * t.element_size() else t


def _svd_omega(names: list[str], d_aug: int, width: int, dtype: torch.dtype, device: torch.device,
               cache: dict) -> torch.Tensor:
    """The stacked test matrices [L, d_aug, width] of the range finder, one per layer, seeded by its name.

    Each layer's is kept in ``cache`` (the engine's, shared by every target it makes): drawing
    float64 normals costs about as much as the rest of the randomized SVD's small-matrix work, and
    they depend only on the name and shape. Memory: width / d_out of the target's own size.
    """
    stack = []
    for name in names:
        key = (name, d_aug, width, dtype, device)
        if key not in cache:
            cache[key] = gaussian(d_aug, width, "svd", name).to(device, dtype)
        stack.append(cache[key])
    return torch.stack(stack)


def _orthonormal(y: torch.Tensor, final: bool = False) -> torch.Tensor:
    """An orthonormal basis [L, m, w] of the columns of each y [L, m, w] (m >= w).

    Only the span matters to the range finder, so any orthonormalisation gives the same basis up
    to rounding. Below float64: Cholesky-QR with the Gram matrix in float64 (GEMMs instead of
    LAPACK's Householder panels, ~2x faster here), twice for the ``final`` basis so that it is
    orthonormal to working precision; Householder QR for float64 inputs (whose Gram would need
    more precision) and for any stack that is too ill-conditioned (rank-deficient targets).
    """
    if y.dtype != torch.float64:
        q = _cholesky_qr(y)
        if q is not None and final:
            q = _cholesky_qr(q, exact_gram=False)
        if q is not None:
            return q
    return torch.linalg.qr(y).Q


_CHOLQR_MIN_PIVOT = 1e-5  # smallest Cholesky pivot ratio (a lower bound on 1 / cond(y)) trusted


def _cholesky_qr(y: torch.Tensor, exact_gram: bool = True) -> torch.Tensor | None:
    """``y R^-1`` with ``R^T R = y^T y``; None when some layer's y is too ill-conditioned for it.

    ``exact_gram``: the Gram matrix is formed in float64 from the float32 values (exact products),
    so it holds cond(y)^2 without loss up to cond(y) ~ 1e6; the result is orthonormal to
    ~eps * cond(y). A second pass on that nearly orthonormal result can form it in y's dtype and
    makes the result orthonormal to ~eps.
    """
    yd = y.double() if exact_gram else y
    r, info = torch.linalg.cholesky_ex((yd.mT @ yd).double(), upper=True)
    pivots = r.diagonal(dim1=-2, dim2=-1)
    ok = (info == 0) & (pivots.amin(-1) > _CHOLQR_MIN_PIVOT * pivots.amax(-1))  # False for NaN too
    if not bool(ok.all()):
        return None
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device).expand_as(r)
    return y @ torch.linalg.solve_triangular(r, eye, upper=True).to(y.dtype)


_GRAM_SVD_MIN_SIGMA = 1e-5  # sigma_k / sigma_1 below which the Gram route falls back to LAPACK's SVD


def _tall_svd(b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k SVD ``b ~ v diag(s) w^T`` of each tall b [L, m, w]: v^T [L, k, m], s [L, k], w [L, w, k].

    Below float64: from the eigendecomposition of the w x w Gram matrix in float64 (the Gram
    squares the spread of b's singular values, which float64 holds), with ``v = b w / s``; v's
    error is ~eps * s_1 / s_j, no worse than LAPACK's SVD in b's precision (~eps * s_1 / gap_j),
    at less than half its cost here. LAPACK's SVD for float64 and for a b whose k-th singular
    value is at rounding level, where ``b w / s`` would not be a unit vector.
    """
    if b.dtype != torch.float64:
        bd = b.double()
        lam, w = torch.linalg.eigh(bd.mT @ bd)  # ascending
        lam, w = lam.flip(-1)[..., :k], w.flip(-1)[..., :k]
        s = lam.clamp_min(0).sqrt()
        ok = s[..., -1] > _GRAM_SVD_MIN_SIGMA * s[..., 0]  # False for NaN too
        if bool(ok.all()):
            w, s = w.to(b.dtype), s.to(b.dtype)
            return (w / s[..., None, :]).mT @ b.mT, s, w  # v^T, contiguous
    v, s, wh = torch.linalg.svd(b, full_matrices=False)
    return v.mT[..., :k, :], s[..., :k], wh.mT[..., :k]


# ---------------------------------------------------------------------- the basis from factors
_FACTOR_BLOCK_ROWS = 8192  # rows of (X, dY) upcast to the accumulation dtype at a time (bounds temporaries)


@dataclass(eq=False)
class LayerFactors:
    """One layer's validation gradient kept as factors: ``G = sum_c dY_c^T [X_c | 1]``.

    ``xs[c]`` [N_c, d_in] and ``dys[c]`` [N_c, d_out] stay in the model's dtype (the tensors the
    backward produced; layers that read the same input share its storage); every product runs in
    ``dtype`` (float32, or float64 for a float64 model), block by block.
    """

    d_in: int
    d_out: int
    has_bias: bool
    dtype: torch.dtype
    device: torch.device
    xs: list[torch.Tensor] = field(default_factory=list)
    dys: list[torch.Tensor] = field(default_factory=list)

    @property
    def d_aug(self) -> int:
        return self.d_in + self.has_bias

    @property
    def num_rows(self) -> int:
        return sum(x.shape[0] for x in self.xs)

    def append(self, x: torch.Tensor, dy: torch.Tensor) -> None:
        self.xs.append(x)
        self.dys.append(dy)

    def extend(self, other: LayerFactors) -> None:
        if (other.d_in, other.d_out, other.has_bias) != (self.d_in, self.d_out, self.has_bias):
            raise ValueError("cannot add validation factors of layers with different shapes")
        self.xs += other.xs
        self.dys += other.dys

    def _blocks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, dy in zip(self.xs, self.dys):
            for start in range(0, x.shape[0], _FACTOR_BLOCK_ROWS):
                stop = start + _FACTOR_BLOCK_ROWS
                yield x[start:stop].to(self.dtype), dy[start:stop].to(self.dtype)

    def times(self, omega: torch.Tensor) -> torch.Tensor:
        """``G_aug @ omega`` for omega [d_aug, w]: ``dY^T (X omega[:d_in] + omega[d_in])``, [d_out, w]."""
        out = omega.new_zeros(self.d_out, omega.shape[1])
        head = omega[:self.d_in]
        for x, dy in self._blocks():
            a = x @ head
            if self.has_bias:
                a += omega[self.d_in]
            out.addmm_(dy.mT, a)
        return out

    def t_times(self, psi: torch.Tensor) -> torch.Tensor:
        """``G_aug^T @ psi`` for psi [d_out, w]: ``[X | 1]^T (dY psi)``, [d_aug, w]."""
        out = psi.new_zeros(self.d_aug, psi.shape[1])
        for x, dy in self._blocks():
            p = dy @ psi
            out[:self.d_in].addmm_(x.mT, p)
            if self.has_bias:
                out[self.d_in] += p.sum(0)
        return out

    def dense(self) -> torch.Tensor:
        """The augmented gradient ``[G | b]`` [d_out, d_aug] itself (d_out * d_aug values)."""
        out = torch.zeros(self.d_out, self.d_aug, dtype=self.dtype, device=self.device)
        for x, dy in self._blocks():
            out[:, :self.d_in].addmm_(dy.mT, x)
            if self.has_bias:
                out[:, self.d_in] += dy.sum(0)
        return out


class Collective:
    """Sums and broadcasts lists of tensors over a torch.distributed group, one flat buffer per
    (dtype, device) per call, so each stage of the range finder costs one collective."""

    def __init__(self, group=None) -> None:
        self.group = group

    def _flat_apply(self, tensors: list[torch.Tensor], op) -> None:
        buckets: dict[tuple, list[torch.Tensor]] = {}
        for t in tensors:
            buckets.setdefault((t.dtype, t.device), []).append(t)
        for ts in buckets.values():
            flat = torch.cat([t.reshape(-1) for t in ts])
            op(flat)
            offset = 0
            for t in ts:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        import torch.distributed as dist

        self._flat_apply(tensors, lambda flat: dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group))

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite every rank's tensors with the group's first rank's."""
        import torch.distributed as dist

        self._flat_apply(tensors, lambda flat: dist.broadcast(flat, group=self.group, group_src=0))


def factor_basis(groups: list[tuple[list[str], list[LayerFactors]]], q: int, omegas: dict,
                 collective: Collective | None = None) -> dict:
    """Top-q singular triplets of every layer's ``G = dY^T [X | 1]`` without forming G.

    ``groups``: (names, factors) of same-shape layers, as ``group_svd`` takes them. The algorithm
    is ``group_svd``'s, stage by stage over all groups: small layers (min(d_out, d_aug) <= 2 *
    width: G itself is O(q * d) values) form G and take the full SVD; the others run the range
    finder with each product taken from the factors: ``Y = G Omega``, ``Z = G^T orth(Y)``,
    ``Y = G orth(Z)`` (power iterations), ``B = G^T orth(Y)``, then the small SVD of B. Exact
    whenever rank(G) <= q + oversample. ``collective`` (several ranks, each holding the factors of
    its own validation tokens): every G-product is a sum over tokens, so each stage's products are
    summed over the ranks in one collective; every rank then factorises identical matrices, and the
    final basis is broadcast from the first rank, so all ranks hold the same bits.
    """
    reduce = collective.sum_ if collective is not None else (lambda tensors: None)
    small, large = [], []
    for names, facs in groups:
        f0 = facs[0]
        k = min(q, f0.d_out, f0.d_aug)
        width = min(k + SVD_OVERSAMPLE, f0.d_out, f0.d_aug)
        (small if min(f0.d_out, f0.d_aug) <= 2 * width else large).append((names, facs, k, width))

    dense = [torch.stack([f.dense() for f in facs]) for _, facs, _, _ in small]
    ys = [torch.stack([f.times(om) for f, om in zip(facs, _svd_omega(names, facs[0].d_aug, width, facs[0].dtype,
                                                                       facs[0].device, omegas))])
          for names, facs, _, width in large]
    reduce(dense + ys)
    for _ in range(SVD_POWER_ITERS):
        zs = [_stack_products(facs, _orthonormal(y), transposed=True) for (_, facs, _, _), y in zip(large, ys)]
        reduce(zs)
        ys = [_stack_products(facs, _orthonormal(z), transposed=False) for (_, facs, _, _), z in zip(large, zs)]
        reduce(ys)
    bases = [_orthonormal(y, final=True) for y in ys]
    bs = [_stack_products(facs, basis, transposed=True) for (_, facs, _, _), basis in zip(large, bases)]
    reduce(bs)

    out = {}
    for (names, facs, _, _), g in zip(small, dense):
        out.update(group_svd(names, g, q, [f.has_bias for f in facs], omegas))
    for (names, facs, k, _), basis, b in zip(large, bases, bs):
        vh, s, ub = _tall_svd(b, k)  # b = G^T Q is tall [d_aug, width]
        u = (ub.mT @ basis.mT).mT
        out.update(_pack(names, [f.has_bias for f in facs], u, s, vh))
    if collective is not None:
        collective.broadcast_([t for entry in out.values() for t in entry if t is not None])
    return out


def _stack_products(facs: list[LayerFactors], m: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Stacked ``G_i^T m_i`` (transposed) or ``G_i m_i`` of a group's layers, m [L, *, w]."""
    return torch.stack([f.t_times(m[i]) if transposed else f.times(m[i]) for i, f in enumerate(facs)])
