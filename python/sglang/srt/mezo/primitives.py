"""Small helpers every layer of the MeZO package may use (this module imports none of it).

* `host_bytes` / `tensor_digest`: a tensor's bytes, copied to the host explicitly, and
  their BLAKE2b digest (checksums across ranks, engines and devices; cache keys);
* `write_json_atomically`: a JSON file that is either the old one or the new one;
* `require_all`: the one policy for loading tensors by name: every expected one present;
* `same_bits`: bitwise equality of a host tensor and one on any device;
* `derived_seed`: a stable 63-bit seed from its parts (directions, sampling).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Container, Iterable

import torch


def host_bytes(tensor: torch.Tensor) -> bytes:
    """The bytes of `tensor` (any device, any layout), copied to the host first: numpy never
    sees device memory."""
    flat = tensor.detach().to("cpu", copy=True).contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def derived_seed(*parts) -> int:
    """A stable 63-bit seed named by `parts` (BLAKE2b of ``"a/b/c"``, not ``hash()``, which
    changes between processes): the same parts give the same seed on every machine."""
    digest = hashlib.blake2b("/".join(str(part) for part in parts).encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


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


def same_bits(reference: torch.Tensor, tensor: torch.Tensor) -> bool:
    """Whether `tensor` holds exactly `reference` (a host tensor, cast to its dtype), bit for
    bit, compared on `tensor`'s device (NaN payloads and the sign of zero count)."""
    if tuple(reference.shape) != tuple(tensor.shape):
        return False
    expected = reference.to(device=tensor.device, dtype=tensor.dtype).contiguous()
    return torch.equal(expected.view(torch.uint8), tensor.detach().contiguous().view(torch.uint8))
