"""The influence engine: every episode's gradient score in one activation-only backward.

For a linear layer ``y = W x + b`` the gradient of episode e is ``G_e = sum_{t in e} g_t x_t^T``
(x_t the layer input, g_t the gradient at its output). Against a validation gradient G:

* exact:   ``<G_e, G> = sum_{t in e} g_t^T (G x_t)``            one GEMM per layer
* sketch:  ``S_e = P_out G_e P_in^T``; ``<S_e, S_val>`` is unbiased  Kronecker random sketch
* target:  ``G ~ U S V^T`` (rank q) => ``<G_e, U S V^T> = <U^T G_e V, S>``  exact if rank(G) <= q
  (the basis comes from the validation factors ``G = dY^T X`` without forming G: ``ippo.influence.lowrank``)

How one backward yields every ``g_t`` without weight gradients: inside ``recording()`` each
hooked layer's output passes through ``_Tap``, an identity autograd node that also takes a
dummy leaf (the anchor). ``torch.autograd.grad(loss, anchor)`` must then traverse every tap,
so autograd computes activation gradients only (weights are not asked for, so their GEMMs are
pruned and ``param.grad`` is never written), and each tap hands its ``dY`` to the engine the
moment it is formed; the engine folds it into the scores and drops it, so peak memory is that
of a plain backward. The tap's context owns the layer input it needs, so nothing is kept once
the graph is freed.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ippo.errors import NonFiniteError

from . import ops
from .backends import resolve
from .fused import InfluenceLinear
from .lowrank import Collective, LayerFactors, _group_svd, factor_basis
from .ops.reference import acc_dtype, num_episodes_arg, segment_outer
from .projections import canonical_name, gaussian
from .selection import Selection, select_episodes

try:  # FSDP2 shards parameters as DTensors (absent from torch builds without torch.distributed)
    from torch.distributed.tensor import DTensor as _DTensor
    from torch.distributed.tensor import Partial as _Partial
except ImportError:
    _DTensor = _Partial = None

try:  # GPT-2 style layers store the weight as [d_in, d_out]
    from transformers.pytorch_utils import Conv1D as _HFConv1D
except ImportError:  # transformers is optional for the engine
    _HFConv1D = None

MODES = ("exact", "sketch", "target")
TARGET_BASES = ("auto", "factor", "dense")


@dataclass(eq=False)
class _Layer:
    name: str  # canonical name (wrapper prefixes stripped)
    module: nn.Module
    d_in: int
    d_out: int
    has_bias: bool


@dataclass(eq=False)
class _AuxModule:
    """A per-token module with trainable parameters that is not scored (embedding, norm, unscored
    linear): ``weighted_backward`` forms its weighted gradient by a local vector-Jacobian product."""

    name: str
    module: nn.Module


@dataclass(eq=False)
class _Record:
    """One call of a hooked (or auxiliary) module inside ``recording()``."""

    layer: _Layer | _AuxModule
    x: torch.Tensor  # the module input, detached (autograd saves it for the weight gradient anyway)
    weighted: bool = False  # recorded with recording(weighted=True)
    fused_rank: int = 0  # recorded by the fused linear path (ippo.influence.fused) at this sketch rank
    a: torch.Tensor | None = None  # fused path: P_in x_t (+ bias column), [N, k_in]
    b: torch.Tensor | None = None  # fused path, during the engine's backward: P_out g_t, [N, k_out]


class _Tap(torch.autograd.Function):
    """Identity on a layer output that reports the output's gradient to the engine."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, anchor: torch.Tensor, engine: InfluenceEngine, record: _Record):
        ctx.engine, ctx.record = engine, record
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        sink = ctx.engine._sink
        if sink is not None:  # only the engine's own backward consumes; a user's .backward() passes through
            sink(ctx.record, dy)
        return dy, None, None, None


@dataclass(frozen=True)
class WeightedBackward:
    """What ``engine.weighted_backward`` found: the episode scores and the selection it applied."""

    scores: torch.Tensor
    selection: Selection
    retained_bytes: int = 0  # peak extra memory of the kept dY (strategy="deferred"); 0 for "two_pass"


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
                basis.update(_group_svd(names, g, q, [self.biases[n] is not None for n in names], self._omegas))
        self._bases[q] = {n: basis[n] for n in self.names}
        return self._bases[q]

    def _augmented(self, name: str) -> torch.Tensor:
        w, b = self.weights[name], self.biases[name]
        return w if b is None else torch.cat([w, b[:, None]], dim=1)


_PER_TOKEN_NORMS = ("RMSNorm", "LayerNorm")


def _is_per_token(module: nn.Module) -> bool:
    """Modules whose output at token t depends only on the input at t and their own parameters,
    so the gradient of sum_e w_e L_e is a VJP with per-token weighted output gradients."""
    if _is_hookable(module) or isinstance(module, (nn.Embedding, nn.LayerNorm)):
        return True
    rms = getattr(nn, "RMSNorm", None)
    return (rms is not None and isinstance(module, rms)) or type(module).__name__.endswith(_PER_TOKEN_NORMS)


def _is_hookable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return _HFConv1D is not None and isinstance(module, _HFConv1D)


def _layer_of(name: str, module: nn.Module) -> _Layer:
    w = module.weight
    if isinstance(module, nn.Linear):
        d_out, d_in = w.shape
    else:  # HF Conv1D: y = x @ W + b with W [d_in, d_out]
        d_in, d_out = w.shape
    return _Layer(canonical_name(name), module, d_in, d_out, module.bias is not None)


class InfluenceEngine:
    """Scores every episode of a batch against a validation gradient in one backward pass.

    Args:
        model: any ``nn.Module`` (a Hugging Face causal LM, a PEFT model, a DDP wrapper...).
        modules: which layers to hook. None: every ``nn.Linear`` / HF ``Conv1D`` whose weight
            requires grad (so LoRA adapters but not frozen base layers). Or a list of module
            names, or a predicate ``(name, module) -> bool``.
        rank: default rank of random sketches (per side) and of the target-aligned basis.
        seed: seed of the random projections (with the layer name).
        backend: "auto" | "torch" | "cpp" | "triton" | "cuda" (see ``ippo.influence.backends()``).
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Iterable[str] | Callable[[str, nn.Module], bool] | None = None,
        rank: int = 64,
        seed: int = 0,
        backend: str = "auto",
    ) -> None:
        self.model, self.rank, self.seed, self.backend = model, _rank_arg(rank, "rank"), int(seed), backend
        self._layers = self._select_layers(model, modules)
        resolve(backend, self._layers[0].module.weight.device)  # fail now on an unavailable backend
        self._anchor = torch.zeros((), requires_grad=True)
        self._recording = False
        self._sink: Callable[[_Record, torch.Tensor], None] | None = None
        self._busy = False  # inside the engine's own backward or replay: hooks stand aside
        self._projections: dict = {}
        self._svd_omegas: dict = {}  # the target basis's random test matrices, shared by this engine's targets

    # ------------------------------------------------------------------ layers and recording
    @staticmethod
    def _select_layers(model: nn.Module, modules) -> list[_Layer]:
        named = dict(model.named_modules())
        if modules is None:
            chosen = [(n, m) for n, m in named.items() if _is_hookable(m) and m.weight.requires_grad]
        elif callable(modules):
            chosen = [(n, m) for n, m in named.items() if _is_hookable(m) and modules(n, m)]
        else:
            chosen = []
            for n in modules:
                if n not in named:
                    raise ValueError(f"module {n!r} is not in the model")
                if not _is_hookable(named[n]):
                    raise ValueError(f"module {n!r} is a {type(named[n]).__name__}, not nn.Linear / Conv1D")
                chosen.append((n, named[n]))
        if not chosen:
            raise ValueError("no module to hook: the model has no nn.Linear / Conv1D whose weight requires grad")
        return [_layer_of(n, m) for n, m in chosen]

    @property
    def module_names(self) -> list[str]:
        """Names of the hooked modules, in model order (wrapper prefixes stripped)."""
        return [layer.name for layer in self._layers]

    @contextlib.contextmanager
    def recording(self, weighted: bool = False, fused_sketch: bool = False) -> Iterator[InfluenceEngine]:
        """Forward passes inside this block have their hooked layers' inputs captured.

        ``weighted=True`` also taps every other module with trainable parameters (embeddings,
        norms, unscored linears), as ``weighted_backward`` needs. ``fused_sketch=True`` runs each
        hooked ``nn.Linear`` through ``ippo.influence.fused.InfluenceLinear``, which forms the sketch
        projections (at the engine's rank) inside the layer's own forward and dgrad GEMMs; every
        mode still works on such a recording. Records live in the autograd graph of each forward:
        they are freed with it, so calling this every iteration does not grow memory.
        """
        if self._recording:
            raise RuntimeError("engine.recording() is already active (it does not nest)")
        fused = [layer for layer in self._layers if fused_sketch and isinstance(layer.module, nn.Linear)]
        handles = [layer.module.register_forward_hook(self._make_hook(layer, weighted))
                   for layer in self._layers if layer not in fused]
        if weighted:
            handles += [aux.module.register_forward_hook(self._make_hook(aux, True)) for aux in self._aux_modules()]
        for layer in fused:  # an instance attribute shadows the class's forward until removed
            layer.module.forward = functools.partial(self._fused_forward, layer, weighted)
        self._recording = True
        try:
            yield self
        finally:
            self._recording = False
            for h in handles:
                h.remove()
            for layer in fused:
                del layer.module.forward

    def _fused_forward(self, layer: _Layer, weighted: bool, x: torch.Tensor) -> torch.Tensor:
        module = layer.module
        if self._busy or not torch.is_grad_enabled():
            return nn.Linear.forward(module, x)
        p_in, p_in_bias, p_out = self._projection(layer, self.rank, x.device, acc_dtype(x.dtype))
        record = _Record(layer, x.detach(), weighted, fused_rank=self.rank)
        return InfluenceLinear.apply(x, module.weight, module.bias, p_in, p_in_bias, p_out, self._anchor, self,
                                     record)

    def _make_hook(self, layer: _Layer | _AuxModule, weighted: bool):
        def hook(module, args, output):
            # Skip no-grad forwards (generation), forwards re-run by activation checkpointing inside
            # the engine's own backward, and the engine's own replays (not on the gradient path).
            if self._busy or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
                return None
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or (isinstance(layer, _Layer) and x.shape[-1] != layer.d_in):
                raise RuntimeError(f"hooked module {layer.name!r}: cannot read its input from the forward call")
            # The tap is an identity: the module's output keeps its values, shape and dtype. An output
            # that the model broadcasts over the batch afterwards (GPT-2's position embedding of [1, T]
            # positions) therefore only sees the sum of the rows' gradients; weighted_backward names
            # such a module instead of guessing the batch (see _check_weighted_fit).
            return _Tap.apply(output, self._anchor, self, _Record(layer, x.detach(), weighted))

        return hook

    # ------------------------------------------------------------------ the one backward
    def _backward(self, loss: torch.Tensor, sink, retain_graph: bool) -> int:
        """Run one activation-only backward of ``loss``, calling ``sink(record, dy)`` per layer call."""
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"loss must be a scalar tensor, got {type(loss).__name__} "
                             f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
        if not loss.requires_grad:
            raise RuntimeError("loss does not require grad: run its forward inside engine.recording() "
                               "with grad enabled")
        if not torch.isfinite(loss.detach()).all():
            raise NonFiniteError(f"loss is not finite ({loss.item()}): refusing to score NaN/Inf gradients")
        if self._sink is not None:
            raise RuntimeError("an engine backward is already running (re-entrant call)")
        calls = 0

        def counting_sink(record: _Record, dy: torch.Tensor) -> None:
            nonlocal calls
            calls += 1
            sink(record, dy)

        self._sink, self._busy = counting_sink, True
        try:
            torch.autograd.grad(loss.reshape(()), [self._anchor], allow_unused=True, retain_graph=retain_graph)
        finally:
            self._sink, self._busy = None, False
        if calls == 0:
            raise RuntimeError(
                "the loss reaches no hooked module: run its forward inside engine.recording() with grad "
                "enabled (activation checkpointing must use use_reentrant=False), and check `modules`")
        return calls

    # ------------------------------------------------------------------ public API
    def target(self, val_loss: torch.Tensor, rank: int | None = None, retain_graph: bool = False,
               basis: str = "auto") -> Target:
        """Validation gradient of ``val_loss`` over the hooked layers (``param.grad`` untouched).

        ``rank=q`` also computes and keeps the rank-q SVD basis used by ``mode="target"``.
        ``basis``: how the target is held. ``"factor"`` keeps each layer's validation inputs and
        output gradients (X [N, d_in], dY [N, d_out]) and builds the rank-q basis from them
        without ever forming G (``mode="target"``'s memory: the validation activations plus
        O(q (d_in + d_out)) per layer); exact and sketch modes form G from them on first use.
        ``"dense"`` forms G inside the backward and keeps no activations (what exact mode needs).
        ``"auto"``: factor when ``rank`` is given (the caller scores in target mode), else dense.
        """
        if rank is not None:
            rank = _rank_arg(rank, "rank")
        if basis not in TARGET_BASES:
            raise ValueError(f"unknown basis {basis!r}: expected one of {TARGET_BASES}")
        factored = basis == "factor" or (basis == "auto" and rank is not None)
        weights: dict[str, torch.Tensor] = {}
        biases: dict[str, torch.Tensor | None] = {}
        factors: dict[str, LayerFactors] = {}
        tokens = 0

        def sink(record: _Record, dy: torch.Tensor) -> None:
            nonlocal tokens
            layer = record.layer
            if not isinstance(layer, _Layer):
                return  # auxiliary modules (weighted recordings) have no target
            x2, dy2 = _flat(record.x, layer.d_in), _flat(dy, layer.d_out)
            dt = acc_dtype(x2.dtype)
            if factored:
                _check_finite(dy2, layer.name, "validation output gradient")
                if layer.name not in factors:
                    factors[layer.name] = LayerFactors(layer.d_in, layer.d_out, layer.has_bias, dt, x2.device)
                    tokens = max(tokens, x2.shape[0])
                factors[layer.name].append(x2, dy2)
                return
            gw = dy2.to(dt).T @ x2.to(dt)
            if layer.name in weights:
                weights[layer.name] += gw
            else:
                weights[layer.name] = gw
                biases[layer.name] = None
                tokens = max(tokens, x2.shape[0])
            if layer.has_bias:
                gb = dy2.to(dt).sum(0)
                biases[layer.name] = gb if biases[layer.name] is None else biases[layer.name] + gb
            _check_finite(gw, layer.name, "validation gradient")

        self._backward(val_loss, sink, retain_graph)
        if factored:
            target = Target(rank=rank, num_tokens=tokens, factors=factors, _omegas=self._svd_omegas)
        else:
            target = Target(weights, biases, rank=rank, num_tokens=tokens, _omegas=self._svd_omegas)
        if rank is not None:
            target.basis(rank)
        return target

    def scores(
        self,
        train_loss: torch.Tensor,
        episode_ids: torch.Tensor,
        target: Target,
        mode: str = "exact",
        per_token: bool = False,
        num_episodes: int | None = None,
        rank: int | None = None,
        retain_graph: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Influence score of every episode: ``<grad L_e, G_val>`` over the hooked layers, [E].

        ``train_loss`` is the summed loss ``sum_e L_e`` (episodes must not interact: one row
        each, or block-diagonal packing). ``episode_ids``: LongTensor [B] (row b is episode
        ids[b]; -1 = ignore the row) or [B, T] (per token; -1 = none). E = max id + 1 unless
        ``num_episodes`` is given; an episode with no tokens scores 0.
        ``mode``: "exact", "sketch" (random Kronecker sketch, unbiased but noisy) or "target"
        (rank-q SVD of the target, q = ``rank`` or the target's or the engine's rank).
        ``per_token=True`` (exact and target modes) also returns the per-token contributions,
        shaped like the batch, which sum to the episode scores.
        """
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: expected one of {MODES}")
        if not isinstance(target, Target):
            raise TypeError(f"target must be an ippo.Target (from engine.target), got {type(target).__name__}")
        if mode == "sketch":
            if per_token:
                raise ValueError("per_token=True is available in exact and target modes, not sketch")
            sk = self.sketches(train_loss, episode_ids, num_episodes=num_episodes, rank=rank,
                               retain_graph=retain_graph)
            return self.scores_from_sketches(sk, target, rank=rank)
        self._check_device(episode_ids)
        ids, n_ep = _check_ids(episode_ids, num_episodes)
        score_layer, acc = self._token_scorer(target, mode, rank, ids)
        self._backward(train_loss, score_layer, retain_graph)
        out = self._episode_scores(acc, ids, n_ep)
        if not per_token:
            return out
        if len(acc) != 1:
            raise ValueError(f"per_token=True needs every hooked layer to see the same batch shape, "
                             f"got {sorted(acc)}")
        (lead, s), = acc.items()
        return out, s.view(lead)

    def _token_scorer(self, target: Target, mode: str, rank: int | None, ids: torch.Tensor):
        """A sink that adds each hooked layer's per-token score to ``acc[batch shape]``."""
        if mode not in ("exact", "target"):
            raise ValueError(f"mode {mode!r} cannot score inside a backward: use exact or target")
        if not isinstance(target, Target):
            raise TypeError(f"target must be an ippo.Target (from engine.target), got {type(target).__name__}")
        q = _rank_arg(rank, "rank") if rank is not None else target.rank or self.rank
        basis = target.basis(q) if mode == "target" else None
        acc: dict[tuple, torch.Tensor] = {}

        def score_layer(record: _Record, dy: torch.Tensor) -> None:
            layer = record.layer
            if not isinstance(layer, _Layer) or layer.name not in target:
                return  # not a scored layer, or the validation loss does not reach it (G_val = 0)
            lead = tuple(record.x.shape[:-1])
            _check_ids_fit(ids, lead, layer.name)
            x2, dy2 = _flat(record.x, layer.d_in), _flat(dy, layer.d_out)
            op = ops.get(resolve(self.backend, x2.device))
            if mode == "exact":
                s = op.exact_token_scores(x2, dy2, target.weights[layer.name], target.biases[layer.name])
            else:
                p_in, p_in_bias, p_out, sigma = basis[layer.name]
                s = op.projected_token_scores(x2, dy2, p_in, p_in_bias, p_out, sigma)
            acc[lead] = acc[lead] + s if lead in acc else s

        return score_layer, acc

    def _episode_scores(self, acc: dict, ids: torch.Tensor, n_ep: int) -> torch.Tensor:
        out = None
        for lead, s in acc.items():
            part = ops.get(resolve(self.backend, s.device)).segment_sum(s, _token_ids(ids, lead), n_ep)
            out = part if out is None else out + part
        if out is None:  # the loss reached only layers the validation loss does not reach
            w = self._layers[0].module.weight
            out = torch.zeros(n_ep, dtype=acc_dtype(w.dtype), device=ids.device)
        return out

    def weighted_backward(
        self,
        loss: torch.Tensor,
        episode_ids: torch.Tensor,
        target: Target,
        mode: str = "exact",
        rule: str = "threshold",
        value: float = 0.0,
        reweight: bool = True,
        num_episodes: int | None = None,
        rank: int | None = None,
        select: Callable[[torch.Tensor], Selection] | None = None,
        retain_graph: bool = False,
        strategy: str = "deferred",
    ) -> WeightedBackward:
        """Score, select and reweight the episodes inside ONE backward of ``loss`` (I-PPO at PPO's cost).

        Runs an activation-only backward of ``loss = sum_e L_e`` that scores every episode from
        each hooked layer's (X, dY), keeps the unweighted dY, selects episodes with
        ``ippo.select_episodes(scores, rule, value)`` (or ``select(scores)``, e.g. after an
        all-gather), and only then forms each trainable parameter's gradient with per-token
        weights: ``.grad += d/dtheta sum_e w_e L_e`` with w_e = selection.weights (or the keep mask
        when ``reweight=False``). Episodes do not interact, so for a linear layer that is
        ``(w_tok * dY)^T X``; embeddings, norms and unscored linears get the same weighting by a
        local vector-Jacobian product. Tokens with episode id -1 get weight 0.

        The forward must run inside ``engine.recording(weighted=True)``. Every trainable
        parameter must sit directly in a per-token module (linear, Conv1D, embedding,
        RMSNorm/LayerNorm); any other raises before the backward, naming the parameter.
        Extra memory: the kept dY of every hooked layer until the gradients are formed.
        ``retain_graph=True`` keeps the graph for a second, unweighted gradient stream (e.g. a KL
        term: ``(kl_coef * kl).backward()`` afterwards adds its plain gradient).
        On an FSDP2-sharded model (DTensor parameters) each weighted gradient is formed full-shape
        from this rank's activations and reduce-scattered into the parameter's shard (the sum over
        ranks, as FSDP's own backward leaves it): a collective, so every rank must call this.

        ``strategy="two_pass"`` trades FLOPs for memory: ``loss`` is then the vector [E] of
        per-episode losses; an activation-only pass scores them (no dY kept), then a standard
        backward of ``sum_e w_e L_e`` forms the gradients (one more activation backward, about
        2·N·P FLOPs). It keeps no dY and works for any parameter type; the recording need not be
        weighted.
        """
        if strategy == "two_pass":
            return self._two_pass_weighted_backward(loss, episode_ids, target, mode, rule, value, reweight,
                                                    num_episodes, rank, select, retain_graph)
        if strategy != "deferred":
            raise ValueError(f"unknown strategy {strategy!r}: expected deferred | two_pass")
        self._check_weightable()
        self._check_device(episode_ids)
        ids, n_ep = _check_ids(episode_ids, num_episodes)
        score_layer, acc = self._token_scorer(target, mode, rank, ids)
        kept: list[tuple[_Record, torch.Tensor]] = []

        def sink(record: _Record, dy: torch.Tensor) -> None:
            if not record.weighted:
                raise RuntimeError("weighted_backward needs its forward inside engine.recording(weighted=True)")
            _check_weighted_fit(ids, tuple(dy.shape[:-1]), record.layer)
            score_layer(record, dy)
            kept.append((record, dy))

        self._backward(loss, sink, retain_graph=retain_graph)
        retained = sum(dy.numel() * dy.element_size() for _, dy in kept)
        scores = self._episode_scores(acc, ids, n_ep)
        selection, episode_weights = self._select(scores, select, rule, value, reweight, n_ep)
        padded_weights = torch.cat([episode_weights, episode_weights.new_zeros(1)])
        self._busy = True  # the local replays below must not be recorded
        try:
            self._form_weighted_grads(kept, ids, n_ep, padded_weights)
        finally:
            self._busy = False
        return WeightedBackward(scores, selection, retained)

    def _form_weighted_grads(self, kept: list, ids: torch.Tensor, n_ep: int, padded_weights: torch.Tensor) -> None:
        """``.grad += d/dtheta sum_e w_e L_e`` from the kept (record, dY) pairs, module by module.

        Modules are visited in a fixed order (hooked layers, then the auxiliary modules, both in
        model order), and a parameter's gradient is written once its last owning module is done
        (a tied weight has two). The order matters under FSDP2: writing a sharded parameter's
        gradient is a collective (``_write_grad``), so every rank must write the same parameters
        in the same order, whatever order its own backward produced the dY in. Each dY is released
        as soon as its gradient is formed.
        """
        by_module: dict[int, list[tuple[_Record, torch.Tensor]]] = {}
        for record, dy in kept:
            by_module.setdefault(id(record.layer.module), []).append((record, dy))
        kept.clear()
        units: list[_Layer | _AuxModule] = [*self._layers, *self._aux_modules()]
        owners: dict[int, int] = {}
        for unit in units:
            for p in unit.module.parameters(recurse=False):
                if p.requires_grad:
                    owners[id(p)] = owners.get(id(p), 0) + 1
        pending: dict[int, torch.Tensor] = {}  # full-shape local gradients not yet written
        for unit in units:
            records = by_module.pop(id(unit.module), [])
            while records:
                record, dy = records.pop()
                lead = tuple(dy.shape[:-1])
                tid = _token_ids(ids, lead)
                w_tok = padded_weights[torch.where(tid >= 0, tid, n_ep)].view(lead)  # id -1 -> weight 0
                if isinstance(unit, _Layer):
                    grads = _linear_grads(unit, record.x, dy, w_tok)
                else:
                    grads = _vjp_grads(unit.module, record.x, dy, w_tok)
                del dy
                for p, g in grads:
                    pending[id(p)] = g if id(p) not in pending else pending[id(p)] + g
            for p in unit.module.parameters(recurse=False):
                if p.requires_grad:
                    owners[id(p)] -= 1
                    if owners[id(p)] == 0:
                        _write_grad(p, pending.pop(id(p), None))

    def _select(self, scores, select, rule, value, reweight, n_ep):
        selection = select(scores) if select is not None else select_episodes(scores, rule, value, self.backend)
        episode_weights = selection.weights if reweight else selection.keep.to(scores.dtype)
        if episode_weights.shape != (n_ep,):
            raise ValueError(f"selection weights must be [{n_ep}], got {tuple(episode_weights.shape)}")
        return selection, episode_weights

    def _two_pass_weighted_backward(self, losses, episode_ids, target, mode, rule, value, reweight, num_episodes,
                                    rank, select, retain_graph) -> WeightedBackward:
        self._check_device(episode_ids)
        ids, n_ep = _check_ids(episode_ids, num_episodes)
        if not isinstance(losses, torch.Tensor) or losses.shape != (n_ep,):
            raise ValueError(f"strategy='two_pass' needs the per-episode losses as a [{n_ep}] tensor, got "
                             f"{tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__}")
        score_layer, acc = self._token_scorer(target, mode, rank, ids)
        self._backward(losses.sum(), score_layer, retain_graph=True)
        scores = self._episode_scores(acc, ids, n_ep)
        selection, episode_weights = self._select(scores, select, rule, value, reweight, n_ep)
        (episode_weights.to(losses.dtype) * losses).sum().backward(retain_graph=retain_graph)
        return WeightedBackward(scores, selection, 0)

    def _aux_modules(self) -> list[_AuxModule]:
        hooked = {id(layer.module) for layer in self._layers}
        return [_AuxModule(canonical_name(n), m) for n, m in self.model.named_modules()
                if id(m) not in hooked and _is_per_token(m)
                and any(p.requires_grad for p in m.parameters(recurse=False))]

    def _check_weightable(self) -> None:
        covered = {id(p) for layer in self._layers for p in layer.module.parameters(recurse=False)}
        covered |= {id(p) for aux in self._aux_modules() for p in aux.module.parameters(recurse=False)}
        for name, p in self.model.named_parameters():
            if p.requires_grad and id(p) not in covered:
                raise NotImplementedError(
                    f"weighted_backward cannot weight parameter {name!r} exactly: it does not sit directly in a "
                    "per-token module (nn.Linear, Conv1D, nn.Embedding, RMSNorm/LayerNorm); freeze it or "
                    "use the separate scoring pass (engine.scores) with a weighted loss")

    def sketches(
        self,
        train_loss: torch.Tensor,
        episode_ids: torch.Tensor,
        num_episodes: int | None = None,
        rank: int | None = None,
        retain_graph: bool = False,
    ) -> torch.Tensor:
        """Kronecker sketches ``S_e = P_out G_e P_in^T`` of every episode's gradient, [E, D].

        D = sum over hooked layers of k_out * k_in with k = min(rank, dim); the bias is an
        extra input column. Layers the loss does not reach stay zero. Projections depend only
        on (seed, layer name), so sketches from different steps, devices or ranks are
        comparable. float32 (float64 for a float64 model).
        """
        self._check_device(episode_ids)
        ids, n_ep = _check_ids(episode_ids, num_episodes)
        rank = self.rank if rank is None else _rank_arg(rank, "rank")
        offsets, total = self._sketch_layout(rank)
        out: torch.Tensor | None = None

        def sink(record: _Record, dy: torch.Tensor) -> None:
            nonlocal out
            layer = record.layer
            if not isinstance(layer, _Layer):
                return
            lead = tuple(record.x.shape[:-1])
            _check_ids_fit(ids, lead, layer.name)
            tid = _token_ids(ids, lead)
            op = ops.get(resolve(self.backend, record.x.device))
            if record.fused_rank == rank and record.b is not None:  # projections came out of the GEMMs
                s = segment_outer(record.a, record.b, tid, n_ep)
            else:
                x2, dy2 = _flat(record.x, layer.d_in), _flat(dy, layer.d_out)
                p_in, p_in_bias, p_out = self._projection(layer, rank, x2.device, acc_dtype(x2.dtype))
                s = op.segment_sketch(x2, dy2, p_in, p_in_bias, p_out, tid, n_ep)
            if out is None:
                out = torch.zeros(n_ep, total, dtype=s.dtype, device=s.device)
            start, size = offsets[layer.name]
            out[:, start:start + size] += s.reshape(n_ep, size)

        self._backward(train_loss, sink, retain_graph)
        return out

    def scores_from_sketches(self, sketches: torch.Tensor, target: Target, rank: int | None = None) -> torch.Tensor:
        """``<S_e, S_val>`` for sketches [E, D] from ``sketches()`` (same engine seed and rank)."""
        rank = self.rank if rank is None else _rank_arg(rank, "rank")
        vec = self.target_sketch(target, rank)
        if sketches.dim() != 2 or sketches.shape[1] != vec.shape[0]:
            raise ValueError(f"sketches must be [E, {vec.shape[0]}] for rank {rank}, got {tuple(sketches.shape)}")
        return sketches @ vec.to(device=sketches.device, dtype=sketches.dtype)

    def target_sketch(self, target: Target, rank: int | None = None) -> torch.Tensor:
        """The target's own sketch ``S_val = P_out G P_in^T``, flattened to [D]."""
        rank = self.rank if rank is None else _rank_arg(rank, "rank")
        key = (self.seed, rank)
        if key not in target._sketches:
            parts = []
            for layer in self._layers:
                if layer.name not in target:
                    k_in, k_out = self._sketch_dims(layer, rank)
                    any_w = next(iter(target.weights.values()))
                    parts.append(torch.zeros(k_out * k_in, dtype=any_w.dtype, device=any_w.device))
                    continue
                g = target._augmented(layer.name)
                p_in, p_in_bias, p_out = self._projection(layer, rank, g.device, g.dtype)
                p_in_aug = p_in if p_in_bias is None else torch.cat([p_in, p_in_bias[:, None]], 1)
                parts.append((p_out @ g @ p_in_aug.T).reshape(-1))
            target._sketches[key] = torch.cat(parts)
        return target._sketches[key]

    # ------------------------------------------------------------------ helpers
    def _sketch_dims(self, layer: _Layer, rank: int) -> tuple[int, int]:
        return min(rank, layer.d_in + layer.has_bias), min(rank, layer.d_out)

    def _sketch_layout(self, rank: int) -> tuple[dict[str, tuple[int, int]], int]:
        offsets, total = {}, 0
        for layer in self._layers:
            k_in, k_out = self._sketch_dims(layer, rank)
            offsets[layer.name] = (total, k_in * k_out)
            total += k_in * k_out
        return offsets, total

    def _projection(self, layer: _Layer, rank: int, device, dtype):
        key = (layer.name, rank, device, dtype)
        if key not in self._projections:
            k_in, k_out = self._sketch_dims(layer, rank)
            p_in = gaussian(k_in, layer.d_in + layer.has_bias, self.seed, layer.name, "in")
            p_out = gaussian(k_out, layer.d_out, self.seed, layer.name, "out")
            p_in, p_out = p_in.to(device=device, dtype=dtype), p_out.to(device=device, dtype=dtype)
            bias = p_in[:, -1].contiguous() if layer.has_bias else None
            self._projections[key] = (p_in[:, :layer.d_in].contiguous(), bias, p_out)
        return self._projections[key]

    def _check_device(self, ids) -> None:
        if not isinstance(ids, torch.Tensor):
            return  # _check_ids names the type problem
        dev = next((p.device for p in (layer.module.weight for layer in self._layers)), None)
        if dev is not None and dev.type != "meta" and ids.device != dev:
            raise ValueError(f"episode_ids is on {ids.device} but the hooked layers are on {dev}")


# ---------------------------------------------------------------------- module-level helpers
def _flat(t: torch.Tensor, d: int) -> torch.Tensor:
    return t.reshape(-1, d)


def _check_finite(t: torch.Tensor, name: str, what: str) -> None:
    # One reduction first (~10x cheaper than isfinite(t).all()): NaN/Inf entries make the sum
    # non-finite, so a finite sum clears t; only a sum that overflowed needs the element check.
    if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
        raise NonFiniteError(f"{what} of module {name!r} contains NaN/Inf")


def _rank_arg(rank, name: str) -> int:
    """A sketch or target rank: an int >= 1 (a clear error instead of a negative tensor dimension)."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1, got {type(rank).__name__} {rank!r}")
    if rank < 1:
        raise ValueError(f"{name} must be >= 1, got {rank}")
    return int(rank)


def _check_ids(episode_ids: torch.Tensor, num_episodes: int | None) -> tuple[torch.Tensor, int]:
    if not isinstance(episode_ids, torch.Tensor):
        raise TypeError(f"episode_ids must be a LongTensor, got {type(episode_ids).__name__}")
    if episode_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"episode_ids must be an integer tensor, got {episode_ids.dtype}")
    if episode_ids.dim() not in (1, 2):
        raise ValueError(f"episode_ids must be [B] or [B, T], got shape {tuple(episode_ids.shape)}")
    ids = episode_ids.long()
    if ids.numel() and int(ids.min()) < -1:
        raise ValueError(f"episode_ids must be >= -1 (-1 = no episode), got min {int(ids.min())}")
    n = int(ids.max()) + 1 if ids.numel() else 0
    if num_episodes is not None:
        num_episodes = num_episodes_arg(num_episodes)
        if n > num_episodes:
            raise ValueError(f"episode id {n - 1} is out of range for num_episodes={num_episodes}")
        n = num_episodes
    return ids, n


def _check_ids_fit(ids: torch.Tensor, lead: tuple, name: str) -> None:
    if ids.dim() == 1:
        ok = len(lead) >= 1 and lead[0] == ids.shape[0]
    else:
        ok = lead == tuple(ids.shape)
    if not ok:
        raise ValueError(f"episode_ids of shape {tuple(ids.shape)} does not match the batch shape {lead} "
                         f"seen by module {name!r} ([B] ids need the batch first; [B, T] ids the exact shape)")


def _check_weighted_fit(ids: torch.Tensor, lead: tuple, layer: _Layer | _AuxModule) -> None:
    """``_check_ids_fit`` for weighted_backward, which must weight every row's gradient on its own."""
    rows = ids.shape[0]
    if rows > 1 and len(lead) >= 1 and lead[0] == 1 and (ids.dim() == 1 or lead[1:] == tuple(ids.shape[1:])):
        raise ValueError(
            f"module {layer.name!r} returned a batch-1 output that the model broadcasts over the batch of {rows} "
            "rows, so its gradient is the sum over episodes and weighted_backward cannot weight it per episode: "
            f"give it per-row inputs (e.g. position_ids of shape [{rows}, T]), freeze it, or use "
            "strategy='two_pass'")
    _check_ids_fit(ids, lead, layer.name)


def _token_ids(ids: torch.Tensor, lead: tuple) -> torch.Tensor:
    """Per-token episode ids for a layer call whose inputs have leading shape ``lead``."""
    if ids.dim() == 2:
        return ids.reshape(-1)
    return ids.view(-1, *([1] * (len(lead) - 1))).expand(lead).reshape(-1)


def _linear_grads(layer: _Layer, x: torch.Tensor, dy: torch.Tensor, w_tok: torch.Tensor
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(w_tok * dY)^T X`` for the weight and ``sum_t w_t dY_t`` for the bias (the deferred wgrad GEMM).

    Needs only the activations, never the weight itself, so it is the same whether the weight is
    a plain tensor or an FSDP2 shard. Returns (parameter, full-shape gradient) pairs.
    """
    x2, dy2 = _flat(x, layer.d_in).to(acc_dtype(x.dtype)), _flat(dy, layer.d_out).to(acc_dtype(x.dtype))
    w = w_tok.reshape(-1, 1).to(x2.dtype)
    # (w * dY)^T X == dY^T (w * X): scale whichever operand is narrower
    grad_w = (dy2 * w).T @ x2 if layer.d_out <= layer.d_in else dy2.T @ (x2 * w)  # [d_out, d_in]
    module = layer.module
    out = [(module.weight, grad_w if isinstance(module, nn.Linear) else grad_w.T)]
    if module.bias is not None and module.bias.requires_grad:
        out.append((module.bias, (w.T @ dy2).squeeze(0)))
    return out


def _vjp_grads(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, w_tok: torch.Tensor
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Weighted gradient of a per-token module's own parameters by replaying it on its input.

    An FSDP2-sharded parameter is all-gathered for the replay (``full_tensor``: a collective; these
    modules are norms, whose weights are small). A plain embedding needs no replay nor its weight.
    """
    if _is_plain_embedding(module) and dy.shape[:-1] == x.shape and module.weight.requires_grad:
        # a plain lookup: its gradient is a scatter-add of the weighted rows (no replay needed)
        dt = acc_dtype(dy.dtype)
        wdy = (dy.to(dt) * w_tok[..., None].to(dt)).reshape(-1, dy.shape[-1])
        g = torch.zeros(module.weight.shape, dtype=dt, device=dy.device).index_add_(0, x.reshape(-1), wdy)
        if module.padding_idx is not None:
            g[module.padding_idx] = 0
        return [(module.weight, g)]
    params = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    local = {n: _full_value(p).detach().requires_grad_() for n, p in params.items()}
    wdy = dy * w_tok[..., None].to(dy.dtype)
    with torch.enable_grad():
        y = torch.func.functional_call(module, local, (x,))
        grads = torch.autograd.grad(y, list(local.values()), grad_outputs=wdy, allow_unused=True)
    return [(p, g) for p, g in zip(params.values(), grads) if g is not None]


def _is_plain_embedding(module: nn.Module) -> bool:
    """nn.Embedding (or a subclass with its forward) without max_norm renormalisation."""
    return (isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward
            and module.max_norm is None and not module.sparse)


def _full_value(p: torch.Tensor) -> torch.Tensor:
    """The whole parameter as a plain tensor (all-gathered if it is an FSDP2 / DTensor shard)."""
    return p.full_tensor() if _is_dtensor(p) else p


def _is_dtensor(t: torch.Tensor) -> bool:
    return _DTensor is not None and isinstance(t, _DTensor)


def _write_grad(p: torch.Tensor, g: torch.Tensor | None) -> None:
    """``p.grad += g`` for a full-shape local gradient ``g`` (None: this call formed none).

    A sharded parameter (FSDP2 keeps a DTensor shard of dim 0) gets its shard of the sum over
    ranks, as FSDP's own backward would leave it: ``g`` is marked Partial (one summand per rank)
    and redistributed to the parameter's placements, a reduce-scatter (plus an all-reduce over the
    replica dimension under HSDP). Every rank takes part, with zeros if it formed no gradient.
    """
    if _is_dtensor(p):
        local = torch.zeros(p.shape, dtype=p.dtype, device=p.to_local().device) if g is None else g.to(p.dtype)
        mesh = p.device_mesh
        g = _DTensor.from_local(local.contiguous(), mesh, [_Partial()] * mesh.ndim,
                                run_check=False).redistribute(mesh, p.placements)
        g = _DTensor.from_local(g.to_local().contiguous(), mesh, p.placements, run_check=False,
                                shape=p.shape, stride=p.stride())
    elif g is None:
        return
    _add_grad(p, g)


def _add_grad(p: torch.Tensor, g: torch.Tensor) -> None:
    g = g.to(p.dtype)
    if p.grad is None:
        p.grad = g.contiguous()
    else:
        p.grad.add_(g)
