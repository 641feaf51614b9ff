"""``Target``: the validation gradient G over the hooked layers, dense or as factors, and its rank-q basis.

``engine.target(val_loss)`` builds one from the validation backward. It holds G either densely (one
[d_out, d_in] matrix per layer, what exact mode needs) or as the validation factors ``G = dY^T [X | 1]``
(``LayerFactors``), from which ``basis(q)`` takes the rank-q SVD that ``mode="target"`` scores against
without ever forming G. The low-rank numerics (randomized SVDs, the factor products, the collectives
of a distributed target) are in ``lowrank.py``; ``LayerFactors``, ``Collective`` and ``factor_basis``
are importable from here too (the old ``ippo.lowrank`` names resolve to this module).
"""

from __future__ import annotations

import math

import torch

from .lowrank import Collective, LayerFactors, factor_basis, group_svd

__all__ = ["Collective", "LayerFactors", "Target", "factor_basis"]


class Target:
    """The validation gradient G over the hooked layers, plus lazily computed views of it.

    Held one of two ways (``kind``):

    * ``"dense"``: ``weights[name]`` [d_out, d_in] (also for HF Conv1D, whose parameter is
      transposed) and ``biases[name]`` [d_out] or None, formed inside the validation backward.
    * ``"factor"``: ``factors[name]``, the layer's validation inputs and output gradients
      (``G = dY^T [X | 1]``). ``basis(q)`` is built from them without forming G (memory
      O(q (d_in + d_out)) per layer on top of the factors); ``weights``/``biases`` (exact and sketch
      modes) form G from them on first use and keep it.

    ``basis(q)`` gives the rank-q SVD used by ``mode="target"``; ``all_reduce()`` sums the gradient
    over a process group; ``add_(other)`` adds another target of the same kind (a second chunk of
    validation data); ``drop_factors()`` frees a factor target's activations once its bases exist.
    """

    def __init__(self, weights: dict[str, torch.Tensor] | None = None,
                 biases: dict[str, torch.Tensor | None] | None = None, rank: int | None = None,
                 num_tokens: int = 0, factors: dict[str, LayerFactors] | None = None,
                 _omegas: dict | None = None) -> None:
        if (weights is None) == (factors is None):
            raise ValueError("a Target holds either the dense gradient (weights, biases) or its factors")
        if weights is not None and biases is None:
            raise ValueError("a dense Target needs biases (a dict of None for layers without a bias)")
        self._weights, self._biases, self.factors = weights, biases, factors
        self.rank, self.num_tokens = rank, num_tokens
        self._bases: dict = {}
        self._sketches: dict = {}
        self._omegas = {} if _omegas is None else _omegas  # the basis's random test matrices (an engine's)
        self._collective: Collective | None = None  # a factor target summed over a process group
        self._factors_dropped = False

    def __repr__(self) -> str:
        return f"Target(kind={self.kind!r}, layers={len(self.names)}, rank={self.rank}, num_tokens={self.num_tokens})"

    @property
    def kind(self) -> str:
        return "factor" if self.factors is not None or self._factors_dropped else "dense"

    @property
    def names(self) -> list[str]:
        """The layers the validation loss reached, in the order their gradients arrived."""
        if self.factors is not None:
            return list(self.factors)
        if self._weights is not None:
            return list(self._weights)
        return list(next(iter(self._bases.values()), {}))

    def __contains__(self, name: str) -> bool:
        for held in (self.factors, self._weights, next(iter(self._bases.values()), None)):
            if held is not None:
                return name in held
        return False

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        if self._weights is None:
            self._densify()
        return self._weights

    @property
    def biases(self) -> dict[str, torch.Tensor | None]:
        if self._biases is None:
            self._densify()
        return self._biases

    @property
    def grads(self) -> dict[str, torch.Tensor]:
        """Per-parameter view: ``{"layer.weight": [d_out, d_in], "layer.bias": [d_out]}``."""
        out = {f"{n}.weight": w for n, w in self.weights.items()}
        out.update({f"{n}.bias": b for n, b in self.biases.items() if b is not None})
        return out

    def norm(self) -> float:
        return math.sqrt(sum(float(t.double().pow(2).sum()) for t in self.grads.values()))

    def memory_bytes(self) -> int:
        """Bytes of the tensors this target holds (dense G, factors, bases), shared storage counted once."""
        seen: dict[int, int] = {}
        tensors = [*(self._weights or {}).values(), *(b for b in (self._biases or {}).values() if b is not None)]
        for f in (self.factors or {}).values():
            tensors += f.xs + f.dys
        tensors += [t for basis in self._bases.values() for entry in basis.values() for t in entry if t is not None]
        for t in tensors:
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return sum(seen.values())

    def _densify(self) -> None:
        if self.factors is None:
            raise RuntimeError("this target's validation factors were dropped (drop_factors): only the bases "
                               "computed before remain; build the target with basis='dense' for exact/sketch modes")
        weights, biases = {}, {}
        for name, f in self.factors.items():
            g = f.dense()
            weights[name] = g[:, :f.d_in].contiguous()
            biases[name] = g[:, f.d_in].contiguous() if f.has_bias else None
        if self._collective is not None:  # every rank holds its own tokens' share: sum them
            for t in [*weights.values(), *(b for b in biases.values() if b is not None)]:
                self._collective.sum_([t])  # one by one: a flat buffer would double G's memory
        self._weights, self._biases = weights, biases

    def all_reduce(self, group=None) -> Target:
        """Sum the gradient over ``group`` (torch.distributed); returns self.

        Dense: an in-place all-reduce of G. Factor: the ranks keep their own tokens' factors, and
        every later ``basis(q)`` (and a first access to ``weights``/``biases``) sums its sketches
        over the group instead, so those calls are collective: make them on every rank, in the
        same order. Every rank must hold the same layers (checked here).
        """
        import torch.distributed as dist

        if self.kind == "dense":
            for t in self.grads.values():
                dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        else:
            if self._collective is not None:
                raise RuntimeError("this factor target is already summed over a process group")
            if self.factors is None:
                raise RuntimeError("all_reduce() needs the validation factors, and they were dropped")
            layout = [(n, f.d_out, f.d_in, f.has_bias) for n, f in self.factors.items()]
            every = [None] * dist.get_world_size(group)
            dist.all_gather_object(every, layout, group=group)
            if any(other != layout for other in every):
                raise RuntimeError("the validation loss reached different hooked layers on different ranks: "
                                   "a factor target needs the same layers on every rank")
            self._collective = Collective(group)
            if self._weights is not None:  # a dense copy formed before: it held this rank's share only
                for t in [*self._weights.values(), *(b for b in self._biases.values() if b is not None)]:
                    self._collective.sum_([t])
        self._bases.clear()
        self._sketches.clear()
        return self

    def add_(self, other: Target) -> Target:
        """Add the gradient of another target of the same kind (disjoint validation data), in place."""
        if not isinstance(other, Target) or other.kind != self.kind:
            raise ValueError(f"can only add a {self.kind} Target to a {self.kind} Target")
        if self._collective is not None or other._collective is not None or self._factors_dropped:
            raise RuntimeError("add_ the targets of all chunks before all_reduce() and drop_factors()")
        if self.factors is not None:
            for name, f in other.factors.items():
                if name in self.factors:
                    self.factors[name].extend(f)
                else:
                    self.factors[name] = LayerFactors(f.d_in, f.d_out, f.has_bias, f.dtype, f.device,
                                                      list(f.xs), list(f.dys))
            self._weights = self._biases = None  # a dense copy no longer matches
        else:
            for name, w in other.weights.items():
                b = other.biases[name]
                if name in self._weights:
                    self._weights[name] += w
                    if b is not None:
                        self._biases[name] = b.clone() if self._biases[name] is None else self._biases[name] + b
                else:
                    self._weights[name], self._biases[name] = w.clone(), None if b is None else b.clone()
        self.num_tokens += other.num_tokens
        self._bases.clear()
        self._sketches.clear()
        return self

    def drop_factors(self) -> Target:
        """Free a factor target's validation activations; the bases computed so far stay usable."""
        if self.factors is not None:
            self.factors = None
            self._factors_dropped = True
        return self

    def basis(self, q: int) -> dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]]:
        """Rank-q SVD of each layer's ``[G | b]``: name -> (p_in [q, d_in], p_in_bias [q] | None,
        p_out [q, d_out], sigma [q]) with ``p_out = U^T``, ``p_in = V^T`` (bias row split off)."""
        if q < 1:
            raise ValueError(f"target rank must be >= 1, got {q}")
        if q in self._bases:
            return self._bases[q]
        groups: dict[tuple, list[str]] = {}  # one batched SVD per (shape, dtype, device)
        if self.kind == "factor":
            if self.factors is None:
                raise RuntimeError(f"no rank-{q} basis was computed before drop_factors(); computed ranks: "
                                   f"{sorted(self._bases)}")
            for n, f in self.factors.items():
                groups.setdefault((f.d_out, f.d_in, f.has_bias, f.dtype, f.device), []).append(n)
            basis = factor_basis([(names, [self.factors[n] for n in names]) for names in groups.values()], q,
                                 self._omegas, self._collective)
        else:
            for n in self.weights:
                g = self.weights[n]
                groups.setdefault((*g.shape, self.biases[n] is not None, g.dtype, g.device), []).append(n)
            basis = {}
            for names in groups.values():
                g = torch.stack([self._augmented(n) for n in names])
                basis.update(group_svd(names, g, q, [self.biases[n] is not None for n in names], self._omegas))
        self._bases[q] = {n: basis[n] for n in self.names}
        return self._bases[q]

    def _augmented(self, name: str) -> torch.Tensor:
        w, b = self.weights[name], self.biases[name]
        return w if b is None else torch.cat([w, b[:, None]], dim=1)
