"""The influence engine: every episode's gradient score in one activation-only backward.

For a linear layer ``y = W x + b`` the gradient of episode e is ``G_e = sum_{t in e} g_t x_t^T``
(x_t the layer input, g_t the gradient at its output). Against a validation gradient G:

* exact:   ``<G_e, G> = sum_{t in e} g_t^T (G x_t)``            one GEMM per layer
* sketch:  ``S_e = P_out G_e P_in^T``; ``<S_e, S_val>`` is unbiased  Kronecker random sketch
* target:  ``G ~ U S V^T`` (rank q) => ``<G_e, U S V^T> = <U^T G_e V, S>``  exact if rank(G) <= q
  (the basis comes from the validation factors ``G = dY^T X`` without forming G: ``target.py``)

``InfluenceEngine`` picks the layers, records them (``recording.py``: the ``Tap`` on each hooked
output hands its ``dY`` to the engine's one activation-only backward, so no weight gradient is formed
and ``param.grad`` is never written), and folds each ``(X, dY)`` into the scores or sketches the
moment it arrives, then drops it: peak memory is that of a plain backward. ``weighted_backward``
also keeps the dY and forms the selected episodes' weighted gradients afterwards
(``weighted_grads.py``). The per-token ops run on the engine's backend, resolved once per device type
(``ops.Dispatch``), with every argument checked by ``ops.contract``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from ippo.errors import NonFiniteError

from . import ops
from .fused import InfluenceLinear
from .lowrank import LayerFactors
from .ops import contract
from .ops.reference import acc_dtype, segment_outer
from .projections import gaussian
from .recording import (
    AuxModule,
    Layer,
    Record,
    SinkSlot,
    Tap,
    aux_modules,
    episode_rows,
    flat,
    select_layers,
    token_ids,
)
from .selection import Selection, select_with
from .target import Target
from .weighted_grads import WeightedBackward, check_weightable, check_weighted_fit, form_weighted_grads

MODES = ("exact", "sketch", "target")
TARGET_BASES = ("auto", "factor", "dense")


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
        self.model, self.rank, self.seed, self.backend = model, contract.rank_arg(rank, "rank"), int(seed), backend
        self._layers = select_layers(model, modules)
        self._ops = ops.Dispatch(backend)  # each device type's ops, resolved once
        self._ops(self._layers[0].module.weight.device)  # fail now on an unavailable backend
        self._anchor = torch.zeros((), requires_grad=True)
        self._recording = False
        self._slot = SinkSlot()  # the running engine backward's sink
        self._busy = False  # inside the engine's own backward or replay: hooks stand aside
        self._projections: dict = {}
        self._svd_omegas: dict = {}  # the target basis's random test matrices, shared by this engine's targets

    # ------------------------------------------------------------------ layers and recording
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
            handles += [aux.module.register_forward_hook(self._make_hook(aux, True))
                        for aux in aux_modules(self.model, self._layers)]
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

    def _fused_forward(self, layer: Layer, weighted: bool, x: torch.Tensor) -> torch.Tensor:
        module = layer.module
        if self._busy or not torch.is_grad_enabled():
            return nn.Linear.forward(module, x)
        p_in, p_in_bias, p_out = self._projection(layer, self.rank, x.device, acc_dtype(x.dtype))
        record = Record(layer, x.detach(), weighted, fused_rank=self.rank)
        return InfluenceLinear.apply(x, module.weight, module.bias, p_in, p_in_bias, p_out, self._anchor, self._slot,
                                     record, self._ops(x.device).name)

    def _make_hook(self, layer: Layer | AuxModule, weighted: bool):
        def hook(module, args, output):
            # Skip no-grad forwards (generation), forwards re-run by activation checkpointing inside
            # the engine's own backward, and the engine's own replays (not on the gradient path).
            if self._busy or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
                return None
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or (isinstance(layer, Layer) and x.shape[-1] != layer.d_in):
                raise RuntimeError(f"hooked module {layer.name!r}: cannot read its input from the forward call")
            # The tap is an identity: the module's output keeps its values, shape and dtype. An output
            # that the model broadcasts over the batch afterwards (GPT-2's position embedding of [1, T]
            # positions) therefore only sees the sum of the rows' gradients; weighted_backward names
            # such a module instead of guessing the batch (see check_weighted_fit).
            return Tap.apply(output, self._anchor, self._slot, Record(layer, x.detach(), weighted))

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
        if self._slot.sink is not None:
            raise RuntimeError("an engine backward is already running (re-entrant call)")
        calls = 0

        def counting_sink(record: Record, dy: torch.Tensor) -> None:
            nonlocal calls
            calls += 1
            sink(record, dy)

        self._slot.sink, self._busy = counting_sink, True
        try:
            torch.autograd.grad(loss.reshape(()), [self._anchor], allow_unused=True, retain_graph=retain_graph)
        finally:
            self._slot.sink, self._busy = None, False
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
            rank = contract.rank_arg(rank, "rank")
        if basis not in TARGET_BASES:
            raise ValueError(f"unknown basis {basis!r}: expected one of {TARGET_BASES}")
        factored = basis == "factor" or (basis == "auto" and rank is not None)
        weights: dict[str, torch.Tensor] = {}
        biases: dict[str, torch.Tensor | None] = {}
        factors: dict[str, LayerFactors] = {}
        tokens = 0

        def sink(record: Record, dy: torch.Tensor) -> None:
            nonlocal tokens
            layer = record.layer
            if not isinstance(layer, Layer):
                return  # auxiliary modules (weighted recordings) have no target
            x2, dy2 = flat(record.x, layer.d_in), flat(dy, layer.d_out)
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
        ids, n_ep = contract.episodes(episode_ids, num_episodes)
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
        q = contract.rank_arg(rank, "rank") if rank is not None else target.rank or self.rank
        basis = target.basis(q) if mode == "target" else None
        acc: dict[tuple, torch.Tensor] = {}
        rows: dict[tuple, torch.Tensor | None] = {}  # per batch shape: the tokens of some episode (id >= 0)

        def score_layer(record: Record, dy: torch.Tensor) -> None:
            layer = record.layer
            if not isinstance(layer, Layer) or layer.name not in target:
                return  # not a scored layer, or the validation loss does not reach it (G_val = 0)
            lead = tuple(record.x.shape[:-1])
            contract.ids_fit(ids, lead, layer.name)
            x2, dy2 = flat(record.x, layer.d_in), flat(dy, layer.d_out)
            if lead not in rows:
                rows[lead] = episode_rows(token_ids(ids, lead))
            live = rows[lead]
            if live is not None:  # tokens of no episode (padding: id -1) score 0: leave them out of the op
                x2, dy2 = x2.index_select(0, live), dy2.index_select(0, live)
            op = self._ops(x2.device)
            if mode == "exact":
                s = op.exact_token_scores(x2, dy2, target.weights[layer.name], target.biases[layer.name])
            else:
                p_in, p_in_bias, p_out, sigma = basis[layer.name]
                s = op.projected_token_scores(x2, dy2, p_in, p_in_bias, p_out, sigma)
            if live is not None:
                s = s.new_zeros(math.prod(lead)).index_copy_(0, live, s)
            acc[lead] = acc[lead] + s if lead in acc else s

        return score_layer, acc

    def _episode_scores(self, acc: dict, ids: torch.Tensor, n_ep: int) -> torch.Tensor:
        out = None
        for lead, s in acc.items():
            part = self._ops(s.device).segment_sum(s, token_ids(ids, lead), n_ep)
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
        units: list[Layer | AuxModule] = [*self._layers, *aux_modules(self.model, self._layers)]
        check_weightable(self.model, units)
        self._check_device(episode_ids)
        ids, n_ep = contract.episodes(episode_ids, num_episodes)
        score_layer, acc = self._token_scorer(target, mode, rank, ids)
        kept: list[tuple[Record, torch.Tensor]] = []

        def sink(record: Record, dy: torch.Tensor) -> None:
            if not record.weighted:
                raise RuntimeError("weighted_backward needs its forward inside engine.recording(weighted=True)")
            check_weighted_fit(ids, tuple(dy.shape[:-1]), record.layer)
            score_layer(record, dy)
            kept.append((record, dy))

        self._backward(loss, sink, retain_graph=retain_graph)
        retained = sum(dy.numel() * dy.element_size() for _, dy in kept)
        scores = self._episode_scores(acc, ids, n_ep)
        selection, episode_weights = self._select(scores, select, rule, value, reweight, n_ep)
        padded_weights = torch.cat([episode_weights, episode_weights.new_zeros(1)])
        self._busy = True  # the local replays below must not be recorded
        try:
            form_weighted_grads(units, kept, ids, n_ep, padded_weights)
        finally:
            self._busy = False
        return WeightedBackward(scores, selection, retained)

    def _select(self, scores, select, rule, value, reweight, n_ep):
        selection = select(scores) if select is not None else select_with(self._ops(scores.device), scores, rule, value)
        episode_weights = selection.weights if reweight else selection.keep.to(scores.dtype)
        if episode_weights.shape != (n_ep,):
            raise ValueError(f"selection weights must be [{n_ep}], got {tuple(episode_weights.shape)}")
        return selection, episode_weights

    def _two_pass_weighted_backward(self, losses, episode_ids, target, mode, rule, value, reweight, num_episodes,
                                    rank, select, retain_graph) -> WeightedBackward:
        self._check_device(episode_ids)
        ids, n_ep = contract.episodes(episode_ids, num_episodes)
        if not isinstance(losses, torch.Tensor) or losses.shape != (n_ep,):
            raise ValueError(f"strategy='two_pass' needs the per-episode losses as a [{n_ep}] tensor, got "
                             f"{tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__}")
        score_layer, acc = self._token_scorer(target, mode, rank, ids)
        self._backward(losses.sum(), score_layer, retain_graph=True)
        scores = self._episode_scores(acc, ids, n_ep)
        selection, episode_weights = self._select(scores, select, rule, value, reweight, n_ep)
        (episode_weights.to(losses.dtype) * losses).sum().backward(retain_graph=retain_graph)
        return WeightedBackward(scores, selection, 0)

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
        ids, n_ep = contract.episodes(episode_ids, num_episodes)
        rank = self.rank if rank is None else contract.rank_arg(rank, "rank")
        offsets, total = self._sketch_layout(rank)
        out: torch.Tensor | None = None

        def sink(record: Record, dy: torch.Tensor) -> None:
            nonlocal out
            layer = record.layer
            if not isinstance(layer, Layer):
                return
            lead = tuple(record.x.shape[:-1])
            contract.ids_fit(ids, lead, layer.name)
            tid = token_ids(ids, lead)
            if record.fused_rank == rank and record.b is not None:  # projections came out of the GEMMs
                s = segment_outer(record.a, record.b, tid, n_ep)
            else:
                x2, dy2 = flat(record.x, layer.d_in), flat(dy, layer.d_out)
                p_in, p_in_bias, p_out = self._projection(layer, rank, x2.device, acc_dtype(x2.dtype))
                s = self._ops(x2.device).segment_sketch(x2, dy2, p_in, p_in_bias, p_out, tid, n_ep)
            if out is None:
                out = torch.zeros(n_ep, total, dtype=s.dtype, device=s.device)
            start, size = offsets[layer.name]
            out[:, start:start + size] += s.reshape(n_ep, size)

        self._backward(train_loss, sink, retain_graph)
        return out

    def scores_from_sketches(self, sketches: torch.Tensor, target: Target, rank: int | None = None) -> torch.Tensor:
        """``<S_e, S_val>`` for sketches [E, D] from ``sketches()`` (same engine seed and rank)."""
        rank = self.rank if rank is None else contract.rank_arg(rank, "rank")
        vec = self.target_sketch(target, rank)
        if sketches.dim() != 2 or sketches.shape[1] != vec.shape[0]:
            raise ValueError(f"sketches must be [E, {vec.shape[0]}] for rank {rank}, got {tuple(sketches.shape)}")
        return sketches @ vec.to(device=sketches.device, dtype=sketches.dtype)

    def target_sketch(self, target: Target, rank: int | None = None) -> torch.Tensor:
        """The target's own sketch ``S_val = P_out G P_in^T``, flattened to [D]."""
        rank = self.rank if rank is None else contract.rank_arg(rank, "rank")
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
    def _sketch_dims(self, layer: Layer, rank: int) -> tuple[int, int]:
        return min(rank, layer.d_in + layer.has_bias), min(rank, layer.d_out)

    def _sketch_layout(self, rank: int) -> tuple[dict[str, tuple[int, int]], int]:
        offsets, total = {}, 0
        for layer in self._layers:
            k_in, k_out = self._sketch_dims(layer, rank)
            offsets[layer.name] = (total, k_in * k_out)
            total += k_in * k_out
        return offsets, total

    def _projection(self, layer: Layer, rank: int, device, dtype):
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
            return  # contract.episodes names the type problem
        dev = next((p.device for p in (layer.module.weight for layer in self._layers)), None)
        if dev is not None and dev.type != "meta" and ids.device != dev:
            raise ValueError(f"episode_ids is on {ids.device} but the hooked layers are on {dev}")


# ---------------------------------------------------------------------- module-level helpers
def _check_finite(t: torch.Tensor, name: str, what: str) -> None:
    # One reduction first (~10x cheaper than isfinite(t).all()): NaN/Inf entries make the sum
    # non-finite, so a finite sum clears t; only a sum that overflowed needs the element check.
    if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
        raise NonFiniteError(f"{what} of module {name!r} contains NaN/Inf")
