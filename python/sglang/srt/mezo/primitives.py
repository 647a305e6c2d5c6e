"""Small helpers every layer of the MeZO package may use (this module imports none of it).

* `host_bytes` / `tensor_digest`: a tensor's bytes, copied to the host explicitly, and
  their BLAKE2b digest (checksums across ranks, engines and devices; cache keys);
* `write_json_atomically`: a JSON file that is either the old one or the new one;
* `DeferredInterrupts`: Ctrl-C held until a block (an update) is complete;
* `require_all`: the one policy for loading tensors by name: every expected one present.
"""

from __future__ import annotations

import hashlib
import json
import signal
import threading
from pathlib import Path
from typing import Container, Iterable

import torch


def host_bytes(tensor: torch.Tensor) -> bytes:
    """The bytes of `tensor` (any device, any layout), copied to the host first: numpy never
    sees device memory."""
    flat = tensor.detach().to("cpu", copy=True).contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def tensor_digest(*tensors: torch.Tensor) -> str:
    """BLAKE2b of the tensors' dtypes, shapes and bytes: equal iff bit-identical."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(host_bytes(t))
    return h.hexdigest()


def write_json_atomically(path, payload, indent=None) -> None:
    """Writes `payload` as JSON to `path` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=indent))
    tmp.replace(path)


def require_all(expected: Iterable[str], weights: Container, what: str = "trainable tensors") -> None:
    """Raises ValueError naming the `expected` names missing from `weights` (a mapping or set of names)."""
    missing = [name for name in expected if name not in weights]
    if missing:
        raise ValueError(f"missing {what}: {missing[:5]} ({len(missing)} of them)")


class DeferredInterrupts:
    """Holds SIGINT until the block ends, so an update is never cut in half by Ctrl-C."""

    def __enter__(self):
        self.received = None
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._hold)
        return self

    def _hold(self, signum, frame):
        self.received = (signum, frame)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            if self.received is not None and callable(self.previous):
                self.previous(*self.received)
        return False


def same_bits(reference: torch.Tensor, tensor: torch.Tensor) -> bool:
    """Whether `tensor` holds exactly `reference` (a host tensor, cast to its dtype), bit for
    bit, compared on `tensor`'s device (NaN payloads and the sign of zero count)."""
    if tuple(reference.shape) != tuple(tensor.shape):
        return False
    expected = reference.to(device=tensor.device, dtype=tensor.dtype).contiguous()
    return torch.equal(expected.view(torch.uint8), tensor.detach().contiguous().view(torch.uint8))
