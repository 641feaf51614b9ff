"""What ``engine.recording()`` records: the hooked layers, one ``Record`` per module call, and the ``Tap``
that hands each recorded output's gradient to the engine's backward.

Inside ``recording()`` each hooked layer's output passes through ``Tap``, an identity autograd node that
also takes a dummy leaf (the anchor). ``torch.autograd.grad(loss, anchor)`` must then traverse every
tap, so autograd computes activation gradients only (weights are not asked for, so their GEMMs are
pruned and ``param.grad`` is never written), and each tap hands its ``dY`` to the sink of the running
engine backward (``SinkSlot``) the moment it is formed. The tap's context owns the ``Record`` (and so
the layer input), so nothing is kept once the graph is freed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .projections import canonical_name

try:  # GPT-2 style layers store the weight as [d_in, d_out]
    from transformers.pytorch_utils import Conv1D as _HFConv1D
except ImportError:  # transformers is optional for the engine
    _HFConv1D = None

_PER_TOKEN_NORMS = ("RMSNorm", "LayerNorm")


@dataclass(eq=False)
class Layer:
    """A hooked (scored) linear layer."""

    name: str  # canonical name (wrapper prefixes stripped)
    module: nn.Module
    d_in: int
    d_out: int
    has_bias: bool


@dataclass(eq=False)
class AuxModule:
    """A per-token module with trainable parameters that is not scored (embedding, norm, unscored
    linear): ``weighted_backward`` forms its weighted gradient by a local vector-Jacobian product."""

    name: str
    module: nn.Module


@dataclass(eq=False)
class Record:
    """One call of a hooked (or auxiliary) module inside ``recording()``."""

    layer: Layer | AuxModule
    x: torch.Tensor  # the module input, detached (autograd saves it for the weight gradient anyway)
    weighted: bool = False  # recorded with recording(weighted=True)
    fused_rank: int = 0  # recorded by the fused linear path (ippo.influence.fused) at this sketch rank
    a: torch.Tensor | None = None  # fused path: P_in x_t (+ bias column), [N, k_in]
    b: torch.Tensor | None = None  # fused path, during the engine's backward: P_out g_t, [N, k_out]


class SinkSlot:
    """Where the running engine backward takes each recorded output's gradient: ``sink(record, dy)``,
    None outside it (a user's own ``.backward()`` then passes through the taps untouched)."""

    def __init__(self) -> None:
        self.sink: Callable[[Record, torch.Tensor], None] | None = None


class Tap(torch.autograd.Function):
    """Identity on a layer output that reports the output's gradient to the engine's backward."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, anchor: torch.Tensor, slot: SinkSlot, record: Record):
        ctx.slot, ctx.record = slot, record
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        sink = ctx.slot.sink
        if sink is not None:
            sink(ctx.record, dy)
        return dy, None, None, None


# ---------------------------------------------------------------------------------------------- modules
def is_hookable(module: nn.Module) -> bool:
    """nn.Linear or a Hugging Face Conv1D: the layers the engine scores."""
    if isinstance(module, nn.Linear):
        return True
    return _HFConv1D is not None and isinstance(module, _HFConv1D)


def is_per_token(module: nn.Module) -> bool:
    """Modules whose output at token t depends only on the input at t and their own parameters,
    so the gradient of sum_e w_e L_e is a VJP with per-token weighted output gradients."""
    if is_hookable(module) or isinstance(module, (nn.Embedding, nn.LayerNorm)):
        return True
    rms = getattr(nn, "RMSNorm", None)
    return (rms is not None and isinstance(module, rms)) or type(module).__name__.endswith(_PER_TOKEN_NORMS)


def _layer_of(name: str, module: nn.Module) -> Layer:
    w = module.weight
    if isinstance(module, nn.Linear):
        d_out, d_in = w.shape
    else:  # HF Conv1D: y = x @ W + b with W [d_in, d_out]
        d_in, d_out = w.shape
    return Layer(canonical_name(name), module, d_in, d_out, module.bias is not None)


def select_layers(model: nn.Module, modules) -> list[Layer]:
    """The layers to hook: ``modules`` is None (every Linear / Conv1D whose weight requires grad), a
    list of module names, or a predicate ``(name, module) -> bool``."""
    named = dict(model.named_modules())
    if modules is None:
        chosen = [(n, m) for n, m in named.items() if is_hookable(m) and m.weight.requires_grad]
    elif callable(modules):
        chosen = [(n, m) for n, m in named.items() if is_hookable(m) and modules(n, m)]
    else:
        chosen = []
        for n in modules:
            if n not in named:
                raise ValueError(f"module {n!r} is not in the model")
            if not is_hookable(named[n]):
                raise ValueError(f"module {n!r} is a {type(named[n]).__name__}, not nn.Linear / Conv1D")
            chosen.append((n, named[n]))
    if not chosen:
        raise ValueError("no module to hook: the model has no nn.Linear / Conv1D whose weight requires grad")
    return [_layer_of(n, m) for n, m in chosen]


def aux_modules(model: nn.Module, layers: list[Layer]) -> list[AuxModule]:
    """The per-token modules with trainable parameters of their own that are not among ``layers``."""
    hooked = {id(layer.module) for layer in layers}
    return [AuxModule(canonical_name(n), m) for n, m in model.named_modules()
            if id(m) not in hooked and is_per_token(m)
            and any(p.requires_grad for p in m.parameters(recurse=False))]


# ---------------------------------------------------------------------------------------------- tokens
def flat(t: torch.Tensor, d: int) -> torch.Tensor:
    """A recorded input or output gradient as [N, d] tokens."""
    return t.reshape(-1, d)


def token_ids(ids: torch.Tensor, lead: tuple) -> torch.Tensor:
    """Per-token episode ids for a module call whose inputs have leading shape ``lead``."""
    if ids.dim() == 2:
        return ids.reshape(-1)
    return ids.view(-1, *([1] * (len(lead) - 1))).expand(lead).reshape(-1)


def episode_rows(tid: torch.Tensor) -> torch.Tensor | None:
    """The flat indices of the tokens that belong to an episode (id >= 0), or None when (nearly) all do.

    Padding (id -1) has a zero output gradient, so it scores 0 and adds nothing to a weighted gradient: the
    engine leaves those rows out of its ops. Below 10% padding the gather costs more than it saves.
    """
    keep = tid >= 0
    return None if int(keep.sum()) > 0.9 * tid.numel() else keep.nonzero().squeeze(1)
