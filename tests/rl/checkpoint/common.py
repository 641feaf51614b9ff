"""What the checkpoint tests share: tiny modules saved and restored (no training), and ``DAMAGE``, the kinds
of damage a checkpoint file can suffer (also used by tests/rl/test_checkpoint_damage.py and test_fsdp.py)."""

from __future__ import annotations

import struct
from pathlib import Path

import torch

from ippo.rl.checkpoint import restore_checkpoint, save_checkpoint


def parts(seed: int):
    torch.manual_seed(seed)
    policy, value = torch.nn.Linear(4, 3), torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(list(policy.parameters()) + list(value.parameters()), lr=0.1)
    (policy(torch.randn(2, 4)).sum() + value(torch.randn(2, 4)).sum()).backward()
    opt.step()  # the optimizer has state to save
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return policy, value, opt, sched


def save(run: Path, it: int, keep_last: int = 2, keep_every: int = 0):
    policy, value, opt, sched = parts(it)
    save_checkpoint(run, it, policy=policy, value=value, optimizer=opt, scheduler=sched, state={"stopped": None},
                    trainable_only=False, keep_last=keep_last, keep_every=keep_every)
    return policy


def restore(run: Path, messages: list[str]):
    policy, value, opt, sched = parts(99)
    state = restore_checkpoint(run, policy=policy, value=value, optimizer=opt, scheduler=sched,
                               trainable_only=False, device=torch.device("cpu"), report=messages.append)
    return state, policy


def truncate(f: Path, keep: float = 0.5) -> None:
    f.write_bytes(f.read_bytes()[: int(f.stat().st_size * keep)])


def flip_tensor_bit(f: Path) -> None:
    """Flip the lowest bit of one byte inside the tensor data (after safetensors' header)."""
    data = bytearray(f.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]
    data[start + (len(data) - start) // 2] ^= 0x01
    f.write_bytes(bytes(data))


DAMAGE = {
    "truncated policy": ("policy.safetensors", truncate),
    "flipped tensor bit": ("policy.safetensors", flip_tensor_bit),
    "missing value": ("value.safetensors", Path.unlink),
    "broken state.json": ("state.json", lambda f: f.write_text('{"iteration": 2, "stopp')),
    "empty optimizer": ("optimizer.pt", lambda f: f.write_bytes(b"")),
    "truncated rng": ("rng.pt", truncate),
    "missing manifest": ("manifest.json", Path.unlink),
    "broken manifest": ("manifest.json", lambda f: f.write_text("{")),
}
