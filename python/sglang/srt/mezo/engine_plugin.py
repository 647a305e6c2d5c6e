"""MeZO weight operations inside SGLang's scheduler processes.

Registered through SGLang's plugin entry point (``sglang.srt.plugins`` -> `register`), which
every SGLang process runs at start-up: it adds ``mezo_*`` methods to the `Scheduler`, and
the trainer calls them with ``Engine.collective_rpc``. Only seeds and scalars cross the
process boundary; z is regenerated here from (seed, HF parameter name, offset), so the
engine draws exactly the z the transformers backend draws.

The engine's parameters are perturbed in place with the same `ModuleScopedPerturbation`
as the transformers backend: a module's tensors are perturbed just before it runs and
restored from a backup right after, so weights are bit-exact after any lr=0 step. Fused
engine tensors (``qkv_proj``, ``gate_up_proj``) are split into row-slice views, one per
logical HF tensor (``q_proj``/``k_proj``/``v_proj``, ``gate_proj``/``up_proj``).

``collective_rpc`` returns no value, so results (tensor lists, checksums) are written as
JSON to a path the caller passes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from pathlib import Path

import torch

from sglang.srt.mezo.perturbation import (
    ModuleScopedPerturbation,
    TrainableTensor,
    WeightVersions,
    commit_update,
    prepare_update,
)

# engine tensor suffix -> [(HF tensor suffix, which block of rows)] in row order
FUSED = {
    ".qkv_proj.weight": [(".q_proj.weight", "q"), (".k_proj.weight", "kv"), (".v_proj.weight", "kv")],
    ".qkv_proj.bias": [(".q_proj.bias", "q"), (".k_proj.bias", "kv"), (".v_proj.bias", "kv")],
    ".gate_up_proj.weight": [(".gate_proj.weight", "ffn"), (".up_proj.weight", "ffn")],
}


def _block_rows(config, block: str) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "q": config.num_attention_heads * head_dim,
        "kv": config.num_key_value_heads * head_dim,
        "ffn": config.intermediate_size,
    }[block]


def logical_tensors(model: torch.nn.Module, config) -> list:
    """[(HF name, tensor view, owner modules)] for every parameter of an SGLang model.

    The view of a fused tensor is its contiguous block of rows. The LM head's weight is
    read by the logits processor (not by calling the head), so the logits processor owns it
    too; with tied embeddings that is the embedding matrix.
    """
    modules = dict(model.named_modules())
    out = []
    seen = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        module_name, _, _ = name.rpartition(".")
        owners = [modules[module_name]]
        logits_processor = getattr(model, "logits_processor", None)
        lm_head = getattr(model, "lm_head", None)
        if logits_processor is not None and lm_head is not None and getattr(lm_head, "weight", None) is param:
            owners.append(logits_processor)
        suffix = next((s for s in FUSED if name.endswith(s)), None)
        if suffix is None:
            out.append((name, param.data, owners))
            continue
        row = 0
        for hf_suffix, block in FUSED[suffix]:
            rows = _block_rows(config, block)
            out.append((name[: -len(suffix)] + hf_suffix, param.data[row : row + rows], owners))
            row += rows
        if row != param.shape[0]:
            raise RuntimeError(f"engine tensor {name} has {param.shape[0]} rows, the HF split gives {row}")
    return out


class EngineMeZO:
    """The MeZO state of one scheduler process."""

    def __init__(self, model, hf_config, kind: str, patterns, model_path: str):
        tensors = logical_tensors(model, hf_config)
        if patterns:
            regexes = [re.compile(p) for p in patterns]
            tensors = [t for t in tensors if any(r.search(t[0]) for r in regexes)]
        self.versions = WeightVersions()
        self.kind = kind
        self.tensors = [
            TrainableTensor(name, view, owners, decay=view.dim() >= 2 and "norm" not in name)
            for name, view, owners in tensors
        ]
        self.perturbation = ModuleScopedPerturbation(self.tensors, kind, self.versions)
        self.scope = contextlib.ExitStack()
        self.model_path = model_path

    def self_test(self) -> dict:
        """Every logical tensor must equal the HF checkpoint's tensor of that name, bit for bit."""
        from safetensors import safe_open

        files = sorted(Path(self.model_path).glob("*.safetensors"))
        if not files:
            return {"checked": 0, "mismatched": [], "missing": []}
        names = {t.name: t for t in self.tensors}
        checked, mismatched = 0, []
        found = set()
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    if key not in names:
                        continue
                    found.add(key)
                    ref = st.get_tensor(key).to(names[key].param.dtype)
                    checked += 1
                    if ref.shape != names[key].param.shape or not torch.equal(ref, names[key].param):
                        mismatched.append(key)
        return {"checked": checked, "mismatched": mismatched, "missing": sorted(set(names) - found)}

    def checksum(self) -> dict:
        return {
            t.name: hashlib.blake2b(
                t.param.contiguous().view(torch.uint8).numpy().tobytes(), digest_size=16
            ).hexdigest()
            for t in self.tensors
        }


def _write(path: str, payload) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)


# ----------------------------------------------------------------------------- RPC methods
# Bound to sglang's Scheduler by `register`; `self` is the Scheduler.
def mezo_setup(self, kind: str, patterns, model_path: str, result_path: str):
    model = self.tp_worker.model_runner.model
    hf_config = self.tp_worker.model_runner.model_config.hf_config
    state = EngineMeZO(model, hf_config, kind, patterns, model_path)
    self._mezo = state
    report = state.self_test()
    report["tensors"] = [[t.name, list(t.param.shape)] for t in state.tensors]
    _write(result_path, report)


def mezo_begin(self, seed: int, scale: float):
    self._mezo.scope.enter_context(self._mezo.perturbation.scope(int(seed), float(scale)))


def mezo_end(self):
    self._mezo.scope.close()


def mezo_update(self, terms, lr: float, weight_decay: float, momentum: float):
    state = self._mezo
    plan = prepare_update(state.tensors, [(int(s), float(g)) for s, g in terms], lr, weight_decay, momentum)
    commit_update(state.tensors, plan, state.kind, state.versions)


def mezo_checksum(self, result_path: str):
    _write(result_path, self._mezo.checksum())


def mezo_load(self, path: str):
    """Loads trainable tensors (HF names) from a safetensors file into the engine, in place."""
    from safetensors.torch import load_file

    weights = load_file(path)
    with torch.no_grad():
        for t in self._mezo.tensors:
            if t.name in weights:
                t.param.copy_(weights[t.name])
                for m in t.owners:
                    self._mezo.versions.bump(m)


def mezo_save(self, result_path: str):
    """Writes the trainable tensors (HF names) to a safetensors file."""
    from safetensors.torch import save_file

    save_file({t.name: t.param.contiguous() for t in self._mezo.tensors}, result_path)


RPC_METHODS = {
    f.__name__: f for f in (mezo_setup, mezo_begin, mezo_end, mezo_update, mezo_checksum, mezo_load, mezo_save)
}


def register() -> None:
    """SGLang plugin entry point: adds the MeZO RPC methods to the Scheduler."""
    from sglang.srt.managers.scheduler import Scheduler

    for name, fn in RPC_METHODS.items():
        setattr(Scheduler, name, fn)
