"""Owner ranks of routed ids on the ids' own device.

``gr_dynemb.owner_ranks`` is the native (host) definition: MurmurHash3's 64-bit finaliser of the salted key, high
32 bits modulo the world size. On a GPU the sharded collection routes every id of every step, so sending the ids to
the host and back for that hash would cost a copy each way and a stall; ``owner_ranks_on_device`` computes the same
bits with torch integer ops where the ids are (int64 products wrap like the native uint64 ones; right shifts are
masked to act as logical shifts) and hands CPU ids to the native function.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gr_dynemb.table import owner_ranks

_SALT = 0x5BD1E9955BD1E995
_M1 = 0xFF51AFD7ED558CCD - (1 << 64)  # the finaliser's multipliers as the int64 of the same bits
_M2 = 0xC4CEB9FE1A85EC53 - (1 << 64)


def _shift_right(x: Tensor, n: int) -> Tensor:
    """Logical right shift of the uint64 bits held in int64 ``x``."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def owner_ranks_on_device(keys: Tensor, world_size: int) -> Tensor:
    """``owner_ranks(keys, world_size)`` computed on ``keys.device`` (int64, same shape and device)."""
    if keys.dtype != torch.int64:
        raise TypeError(f"keys must be int64, got {keys.dtype}")
    if world_size <= 0:
        raise ValueError(f"world_size must be positive, got {world_size}")
    if keys.device.type == "cpu":
        return owner_ranks(keys, world_size)
    return hashed_owners(keys, world_size)


def hashed_owners(keys: Tensor, world_size: int) -> Tensor:
    """The owner hash in torch ops on any device (what ``owner_ranks_on_device`` runs on a GPU)."""
    h = keys ^ _SALT
    h = (h ^ _shift_right(h, 33)) * _M1
    h = (h ^ _shift_right(h, 33)) * _M2
    h = h ^ _shift_right(h, 33)
    return _shift_right(h, 32) % world_size
