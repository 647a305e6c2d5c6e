"""The files the trainer and the engine's scheduler processes exchange (both sides import
this module): each RPC method's acknowledgement, one JSON file per rank (``collective_rpc``
returns no value), and the shards a rank saves, gathered by the trainer into the unsharded
tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

from sglang.srt.mezo.sharding import ShardLayout, gather


def ack_file(directory, rank: int) -> Path:
    """Where tensor-parallel rank `rank` acknowledges an RPC call (`engine_plugin._acknowledged`)."""
    return Path(directory) / f"tp{rank}.json"


def shard_file(directory, rank: int) -> Path:
    """Where tensor-parallel rank `rank` writes its parts of the trainable tensors."""
    return Path(directory) / f"tp{rank}.safetensors"


def write_shards(tensors: list, directory, rank: int) -> None:
    """This rank's part of every trainable tensor, copied to the host, with its layout in the
    file's metadata."""
    from safetensors.torch import save_file

    values = {t.name: t.param.detach().to("cpu", copy=True).contiguous() for t in tensors}
    layouts = {t.name: t.layout.as_json() for t in tensors}
    save_file(values, str(shard_file(directory, rank)), metadata={"layouts": json.dumps(layouts)})


def read_gathered(directory, tp_size: int) -> dict:
    """name -> the unsharded tensor, gathered from the `tp_size` ranks' shard files
    (`sharding.gather`: every element held, replicas bit-identical)."""
    from safetensors import safe_open

    pieces: dict = {}
    for rank in range(tp_size):
        with safe_open(str(shard_file(directory, rank)), framework="pt") as st:
            layouts = json.loads(st.metadata()["layouts"])
            for name in st.keys():
                pieces.setdefault(name, []).append((ShardLayout.from_json(layouts[name]), st.get_tensor(name)))
    return {name: gather(name, parts) for name, parts in pieces.items()}
