"""``engine.weighted_backward``'s gradients: ``.grad += d/dtheta sum_e w_e L_e`` without a second backward.

Episodes do not interact, so once the scores (and so the weights w_e) are known, each trainable
module's weighted gradient follows from what the one activation-only backward kept: for a linear
layer the deferred weight-gradient GEMM ``(w_tok * dY)^T X``; for any other per-token module
(embedding, norm, unscored linear) a local vector-Jacobian product replayed on its recorded input.
An FSDP2-sharded parameter (a DTensor) gets its shard of the sum over ranks by a reduce-scatter
(``_write_grad``), as FSDP's own backward would leave it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .ops import contract
from .ops.reference import acc_dtype
from .recording import AuxModule, Layer, Record, flat, token_ids
from .selection import Selection

try:  # FSDP2 shards parameters as DTensors (absent from torch builds without torch.distributed)
    from torch.distributed.tensor import DTensor as _DTensor
    from torch.distributed.tensor import Partial as _Partial
except ImportError:
    _DTensor = _Partial = None


@dataclass(frozen=True)
class WeightedBackward:
    """What ``engine.weighted_backward`` found: the episode scores and the selection it applied."""

    scores: torch.Tensor
    selection: Selection
    retained_bytes: int = 0  # peak extra memory of the kept dY (strategy="deferred"); 0 for "two_pass"


def check_weightable(model: nn.Module, units: list[Layer | AuxModule]) -> None:
    """Every trainable parameter of ``model`` sits directly in one of ``units`` (else no exact weighting)."""
    covered = {id(p) for unit in units for p in unit.module.parameters(recurse=False)}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in covered:
            raise NotImplementedError(
                f"weighted_backward cannot weight parameter {name!r} exactly: it does not sit directly in a "
                "per-token module (nn.Linear, Conv1D, nn.Embedding, RMSNorm/LayerNorm); freeze it or "
                "use the separate scoring pass (engine.scores) with a weighted loss")


def check_weighted_fit(ids: torch.Tensor, lead: tuple, layer: Layer | AuxModule) -> None:
    """``contract.ids_fit`` for weighted_backward, which must weight every row's gradient on its own."""
    rows = ids.shape[0]
    if rows > 1 and len(lead) >= 1 and lead[0] == 1 and (ids.dim() == 1 or lead[1:] == tuple(ids.shape[1:])):
        raise ValueError(
            f"module {layer.name!r} returned a batch-1 output that the model broadcasts over the batch of {rows} "
            "rows, so its gradient is the sum over episodes and weighted_backward cannot weight it per episode: "
            f"give it per-row inputs (e.g. position_ids of shape [{rows}, T]), freeze it, or use "
            "strategy='two_pass'")
    contract.ids_fit(ids, lead, layer.name)


def form_weighted_grads(units: list[Layer | AuxModule], kept: list[tuple[Record, torch.Tensor]], ids: torch.Tensor,
                        n_ep: int, padded_weights: torch.Tensor) -> None:
    """``.grad += d/dtheta sum_e w_e L_e`` from the kept (record, dY) pairs, module by module.

    ``units``: the modules in a fixed order (the engine's: hooked layers, then the auxiliary modules,
    both in model order); ``padded_weights`` [E + 1]: the episode weights and a 0 for id -1. Modules are
    visited in that order, and a parameter's gradient is written once its last owning module is done
    (a tied weight has two). The order matters under FSDP2: writing a sharded parameter's
    gradient is a collective (``_write_grad``), so every rank must write the same parameters
    in the same order, whatever order its own backward produced the dY in. Each dY is released
    as soon as its gradient is formed.
    """
    by_module: dict[int, list[tuple[Record, torch.Tensor]]] = {}
    for record, dy in kept:
        by_module.setdefault(id(record.layer.module), []).append((record, dy))
    kept.clear()
    owners: dict[int, int] = {}
    for unit in units:
        for p in unit.module.parameters(recurse=False):
            if p.requires_grad:
                owners[id(p)] = owners.get(id(p), 0) + 1
    pending: dict[int, torch.Tensor] = {}  # full-shape local gradients not yet written
    live_rows: dict[tuple, torch.Tensor | None] = {}  # per batch shape: the tokens whose weight is not 0
    for unit in units:
        records = by_module.pop(id(unit.module), [])
        while records:
            record, dy = records.pop()
            lead = tuple(dy.shape[:-1])
            tid = token_ids(ids, lead)
            w_tok = padded_weights[torch.where(tid >= 0, tid, n_ep)].view(lead)  # id -1 -> weight 0
            if isinstance(unit, Layer):
                if lead not in live_rows:
                    live_rows[lead] = nonzero_rows(w_tok)
                grads = _linear_grads(unit, record.x, dy, w_tok, live_rows[lead])
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


def nonzero_rows(w_tok: torch.Tensor) -> torch.Tensor | None:
    """The flat token indices whose weight is not 0, or None when that is (nearly) all of them.

    Dropped episodes (weight 0) and padding add nothing to a weighted gradient, so the deferred GEMMs leave
    their rows out: with I-PPO keeping ~70% of the episodes, the wgrad GEMMs shrink by ~30% -- the update then
    costs what PPO's would on the kept episodes alone. (Below 10% zeros the gather costs more than it saves.)
    """
    w = w_tok.reshape(-1)
    keep = w != 0
    n = int(keep.sum())
    return None if n > 0.9 * w.numel() else keep.nonzero().squeeze(1)


def _linear_grads(layer: Layer, x: torch.Tensor, dy: torch.Tensor, w_tok: torch.Tensor,
                  rows: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(w_tok * dY)^T X`` for the weight and ``sum_t w_t dY_t`` for the bias (the deferred wgrad GEMM), over
    the token rows ``rows`` only (None: all; the others have weight 0).

    Needs only the activations, never the weight itself, so it is the same whether the weight is
    a plain tensor or an FSDP2 shard. Returns (parameter, full-shape gradient) pairs.
    """
    x2, dy2 = flat(x, layer.d_in).to(acc_dtype(x.dtype)), flat(dy, layer.d_out).to(acc_dtype(x.dtype))
    w = w_tok.reshape(-1, 1).to(x2.dtype)
    if rows is not None:
        x2, dy2, w = x2.index_select(0, rows), dy2.index_select(0, rows), w.index_select(0, rows)
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
