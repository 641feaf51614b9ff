"""One argument contract for every op (``ippo.influence.ops.contract``): the same bad input raises the same
exception type with the same message on every backend.

Each case breaks one argument of one op and is fed to ``ops.get(backend)`` for every backend available
here: torch and cpp on CPU tensors, triton on CPU tensors under ``TRITON_INTERPRET=1`` (CUDA tensors on
a GPU), cuda on CUDA tensors where a GPU exists. Without a GPU the cuda backend still runs every case
whose error comes before the device check (CPU tensors reach no launcher: the contract raises first);
the id-range cases, which need tensors on the backend's device, are skipped there. The expected error
is the torch reference's on the same inputs, so the message must match it exactly, plus a pattern.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from ippo.influence import backends, ops
from ippo.influence.ops import contract, reference

INFO = backends()
BACKENDS = ["torch", "cpp", "triton", "cuda"]
GPU = torch.cuda.is_available()


def _importable(backend: str) -> bool:
    try:
        ops.get(backend)
    except ImportError:
        return False
    return True


def setup(backend: str) -> tuple[str, bool]:
    """(device of the test tensors, whether the backend can run on them) or skip."""
    if backend == "cuda" and not INFO["cuda"]:
        if not _importable("cuda"):
            pytest.skip(f"cuda backend unavailable: {INFO['cuda'].reason}")
        return "cpu", False  # contract checks before the device check only
    if not INFO[backend]:
        pytest.skip(f"{backend} backend unavailable: {INFO[backend].reason}")
    return ("cuda" if GPU and backend in ("cuda", "triton") else "cpu"), True


def rnd(*shape):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(len(shape))).float()


def base(op: str) -> dict:
    """Valid arguments of ``op`` (N=6 tokens, d_in=4, d_out=3, k=2, E=3)."""
    x, dy, ids = rnd(6, 4), rnd(6, 3), torch.tensor([0, 1, -1, 2, 2, 0])
    return {
        "exact_token_scores": {"x": x, "dy": dy, "g": rnd(3, 4), "g_bias": rnd(3)},
        "projected_token_scores": {"x": x, "dy": dy, "p_in": rnd(2, 4), "p_in_bias": rnd(2), "p_out": rnd(2, 3),
                                   "weight": rnd(2)},
        "segment_sketch": {"x": x, "dy": dy, "p_in": rnd(2, 4), "p_in_bias": rnd(2), "p_out": rnd(5, 3),
                           "token_episode": ids, "num_episodes": 3},
        "segment_sum": {"values": rnd(6), "token_episode": ids, "num_episodes": 3},
        "select_episodes": {"scores": rnd(5), "rule": "bottom_fraction", "value": 0.4},
        "score_and_select": {"sketches": rnd(5, 4), "target": rnd(4), "rule": "bottom_fraction", "value": 0.4},
    }[op]


FLOAT_ARGS = {
    "exact_token_scores": ("x", "dy", "g", "g_bias"),
    "projected_token_scores": ("x", "dy", "p_in", "p_in_bias", "p_out", "weight"),
    "segment_sketch": ("x", "dy", "p_in", "p_in_bias", "p_out"),
    "select_episodes": ("scores",),
    "score_and_select": ("sketches", "target"),
}
ID_OPS = ("segment_sketch", "segment_sum")
RULE_OPS = ("select_episodes", "score_and_select")


def cases() -> list:
    """(op, changes to the valid arguments, exception type, message pattern, whether it needs tensors on the
    backend's device). A change is ``name: (how, arg)``, applied by ``_changed``."""
    out = []

    def case(op, cid, change, exc, match, on_device=False):
        out.append(pytest.param(op, change, exc, match, on_device, id=f"{op}-{cid}"))

    for op, names in FLOAT_ARGS.items():
        for name in names:
            case(op, f"{name}-list", {name: ("list", None)}, TypeError, rf"^{name} must be a torch\.Tensor, got list")
            case(op, f"{name}-ndim", {name: ("ndim", None)}, ValueError, rf"^{name} must be \d-D .*, got shape")
            case(op, f"{name}-int", {name: ("dtype", torch.int64)}, ValueError, rf"^{name} must be a floating tensor")
    sizes = {
        "exact_token_scores": {"dy": (5, 3), "g": (4, 4), "g_bias": (4,)},
        "projected_token_scores": {"dy": (5, 3), "p_in": (2, 5), "p_in_bias": (3,), "weight": (3,)},
        "segment_sketch": {"dy": (5, 3), "p_in": (2, 5), "p_out": (5, 4), "p_in_bias": (3,), "token_episode": (5,)},
        "segment_sum": {"token_episode": (5,)},
        "score_and_select": {"target": (3,)},
    }
    what = {"dy": r"dy\.shape\[0\]", "g": r"g\.shape\[0\]", "g_bias": "g_bias length", "p_in": r"p_in\.shape\[1\]",
            "p_in_bias": "p_in_bias length", "weight": "weight length", "p_out": r"p_out\.shape\[1\]",
            "token_episode": "token_episode length", "target": "target length"}
    for op, changes in sizes.items():
        for name, shape in changes.items():
            case(op, f"{name}-size", {name: ("shape", shape)}, ValueError, rf"^{what[name]} \(.*\): expected \d+, got \d+")
    case("exact_token_scores", "g-cols", {"g": ("shape", (3, 5))}, ValueError, r"^g\.shape\[1\] \(d_in, from x\)")
    case("projected_token_scores", "p_out-rows", {"p_out": ("shape", (3, 3))}, ValueError, r"^p_out\.shape\[0\] \(q")
    case("segment_sum", "values-complex", {"values": ("dtype", torch.complex64)}, ValueError,
         r"^values must be a real tensor")
    case("segment_sum", "values-list", {"values": ("list", None)}, TypeError, r"^values must be a torch\.Tensor")
    case("segment_sum", "values-ndim", {"values": ("ndim", None)}, ValueError, r"^values must be 1-D \[N\]")
    for op in ID_OPS:
        case(op, "ids-list", {"token_episode": ("list", None)}, TypeError, r"^token_episode must be a torch\.Tensor")
        case(op, "ids-ndim", {"token_episode": ("ndim", None)}, ValueError, r"^token_episode must be 1-D \[N\]")
        for dtype in (torch.float32, torch.bool, torch.complex64):
            case(op, f"ids-{dtype}", {"token_episode": ("dtype", dtype)}, ValueError,
                 r"^token_episode must be an integer tensor \(int8/int16/int32/int64/uint8\)")
        case(op, "ids-below-minus-1", {"token_episode": ("ids", [0, 1, -2, 2, 2, 0])}, ValueError,
             r"^token_episode must lie in \[-1, 3\) .*got min -2, max 2; out of range at tokens \[2\]", True)
        case(op, "ids-too-large", {"token_episode": ("ids", [0, 1, -1, 3, 2, 4])}, ValueError,
             r"^token_episode must lie in \[-1, 3\) .*got min -1, max 4; out of range at tokens \[3, 5\]", True)
        case(op, "num_episodes-negative", {"num_episodes": ("set", -1)}, ValueError, r"^num_episodes must be >= 0, got -1")
        for bad in (3.0, True, "3", None):
            case(op, f"num_episodes-{bad!r}", {"num_episodes": ("set", bad)}, TypeError, r"^num_episodes must be an int")
    for op in RULE_OPS:
        for bad in ("0.3", None, True, [0.3], torch.tensor(0.3), 1j):
            case(op, f"value-{bad!r}", {"value": ("set", bad)}, TypeError, r"^value must be a number \(int or float\)")
        case(op, "rule-unknown", {"rule": ("set", "top_k")}, ValueError, r"^unknown rule 'top_k'")
        case(op, "rule-int", {"rule": ("set", 3)}, TypeError, r"^rule must be a string, got int")
        for rule in ("bottom_fraction", "negative_bottom_fraction"):
            for bad in (-0.1, 1.5, float("nan")):
                case(op, f"{rule}-{bad}", {"rule": ("set", rule), "value": ("set", bad)}, ValueError,
                     rf"^{rule} needs a fraction in \[0, 1\], got")
    for op in ops.OPS:
        tensors = [k for k, v in base(op).items() if isinstance(v, torch.Tensor)]
        if len(tensors) > 1:
            case(op, "mixed-devices", {tensors[-1]: ("device", "meta")}, ValueError,
                 rf"^all tensors must be on one device: {tensors[-1]} is on meta, {tensors[0]} on (cpu|cuda)")
    return out


def _changed(t, how: tuple):
    kind, arg = how
    return {
        "set": lambda: arg,
        "list": lambda: t.tolist(),
        "ndim": lambda: t[None],
        "dtype": lambda: t.to(arg),
        "device": lambda: t.to(arg),
        "shape": lambda: torch.zeros(arg, dtype=t.dtype, device=t.device),
        "ids": lambda: torch.tensor(arg, device=t.device),
    }[kind]()


def _apply(op: str, change: dict, device: str) -> dict:
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in base(op).items()}
    for name, how in change.items():
        args[name] = _changed(args[name], how)
    return args


def _raised(fn, args: dict) -> Exception:
    try:
        fn(**args)
    except Exception as e:  # noqa: BLE001 -- the type is what the tests compare
        return e
    raise AssertionError(f"{fn.__name__} accepted {args}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,change,exc,match,on_device", cases())
def test_same_error_on_every_backend(backend, op, change, exc, match, on_device):
    device, runs_here = setup(backend)
    if on_device and not runs_here:
        pytest.skip("this check comes after the device check: it needs tensors on the backend's device")
    args = _apply(op, change, device)
    expected = _raised(getattr(ops.get("torch"), op), args)
    got = _raised(getattr(ops.get(backend), op), args)
    assert type(expected) is exc, repr(expected)
    assert re.search(match, str(expected)), str(expected)
    assert type(got) is exc, repr(got)
    assert str(got) == str(expected)


@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda"])
@pytest.mark.parametrize("op", ops.OPS)
def test_wrong_device_type(backend, op):
    """A backend states the device types it runs on (``DEVICE_TYPES``); a tensor of another type is a
    ValueError naming the backend, raised before anything runs."""
    setup(backend)
    device_types = importlib.import_module(f"ippo.influence.ops.{backend}").DEVICE_TYPES
    foreign = "meta" if "cpu" in device_types else "cpu"
    args = _apply(op, {}, foreign)
    first = next(k for k, v in args.items() if isinstance(v, torch.Tensor))
    kinds = " or ".join(device_types)
    with pytest.raises(ValueError, match=rf"^{first} must be a {kinds} tensor for the {backend} backend, "
                                         rf"got device {foreign}"):
        getattr(ops.get(backend), op)(**args)


@pytest.mark.parametrize("op", ops.OPS)
def test_checks_have_the_op_signatures(op):
    check = inspect.signature(getattr(contract, op)).parameters
    ref = inspect.signature(getattr(reference, op)).parameters
    assert [(p.name, p.default) for p in ref.values()] == [
        (p.name, p.default) for p in check.values() if p.kind is not p.KEYWORD_ONLY]
    assert [p.name for p in check.values() if p.kind is p.KEYWORD_ONLY] == ["backend", "device_types"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_integer_id_dtype_is_accepted(backend):
    """One set of id dtypes on every backend, converted to int64 (ids of -1 need a signed type)."""
    device, runs_here = setup(backend)
    if not runs_here:
        pytest.skip("needs tensors on the backend's device")
    ns = ops.get(backend)
    values, signed, unsigned = rnd(6).to(device), [0, 1, -1, 2, 2, 0], [0, 1, 1, 2, 2, 0]
    sketch = base("segment_sketch")
    sketch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in sketch.items()}
    for dtype in contract.ID_DTYPES:
        ids = torch.tensor(unsigned if dtype == torch.uint8 else signed, device=device)
        assert torch.equal(ns.segment_sum(values, ids.to(dtype), 3), ns.segment_sum(values, ids, 3)), dtype
        got = ns.segment_sketch(**{**sketch, "token_episode": ids.to(dtype)})
        assert torch.equal(got, ns.segment_sketch(**{**sketch, "token_episode": ids})), dtype


def test_dispatch_checks_then_runs_the_backend_function():
    ns = ops.get("torch")
    for op in ops.OPS:
        assert getattr(ns, op).__wrapped__ is getattr(reference, op)
    with pytest.raises(TypeError, match="num_episodes must be an int"):  # the fused path's reduction too
        reference.segment_outer(torch.ones(4, 2), torch.ones(4, 3), torch.tensor([0, 1, 1, 2]), 3.0)
