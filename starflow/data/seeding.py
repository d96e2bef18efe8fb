"""Seeds of random draws that every process and every resumed run agrees on."""
from __future__ import annotations

import hashlib

__all__ = ["sample_seed"]


def sample_seed(*parts: object) -> int:
    """A 63-bit seed from any values, identical in every process and run (no Python hash randomisation): the
    seed of a shard stream's shuffle and decoding, of a clip's start and rate (``sample_seed(seed, epoch,
    index)``), and of training sample ``index`` of step ``step`` (``sample_seed(seed, step, index)``; index -1:
    the draws shared by the whole step)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big") >> 1
