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

With a LoRA adapter the base stays frozen and MeZO trains the adapter where the forward
reads it: SGLang copies adapters once into its LoRA memory pool (q/k/v and gate/up stacked
per layer), so the trainable tensors are views into the adapter's pool slot, one per peft
tensor, owned by the LoRA-wrapped layer that reads them.

``collective_rpc`` returns no value, so every method writes its outcome (its result, or the
error it raised) as JSON to a path the caller passes (`_acknowledged`).
"""

from __future__ import annotations

import contextlib
import functools
import re
from pathlib import Path

import torch

from sglang.srt.mezo.perturbation import (
    ModuleScopedPerturbation,
    TrainableTensor,
    WeightVersions,
    commit_update,
    prepare_update,
    weight_decay_applies,
)
from sglang.srt.mezo.primitives import require_all, tensor_digest, write_json_atomically

# engine tensor suffix -> [(HF tensor suffix, which block of rows)] in row order
FUSED = {
    ".qkv_proj.weight": [(".q_proj.weight", "q"), (".k_proj.weight", "kv"), (".v_proj.weight", "kv")],
    ".qkv_proj.bias": [(".q_proj.bias", "q"), (".k_proj.bias", "kv"), (".v_proj.bias", "kv")],
    ".gate_up_proj.weight": [(".gate_proj.weight", "ffn"), (".up_proj.weight", "ffn")],
}


# peft LoRA projection -> (SGLang's LoRA module, the projections stacked in it, in order)
LORA_STACKS = {
    "q_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    "k_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    "v_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    "gate_proj": ("gate_up_proj", ("gate_proj", "up_proj")),
    "up_proj": ("gate_up_proj", ("gate_proj", "up_proj")),
    "o_proj": ("o_proj", ("o_proj",)),
    "down_proj": ("down_proj", ("down_proj",)),
}
OUTPUT_BLOCK = {"q_proj": "q", "k_proj": "kv", "v_proj": "kv", "gate_proj": "ffn", "up_proj": "ffn"}
LORA_WEIGHT = re.compile(r"\.layers\.(\d+)\..*\b(" + "|".join(LORA_STACKS) + r")\.lora_([AB])\.weight$")


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


def lora_pool_tensors(lora_manager, slot: int, shapes: dict, config) -> list:
    """[(peft name, view into the adapter's pool slot, owner modules)] for a resident adapter.

    `shapes` maps the adapter's peft tensor names to their shapes. Within a stacked module
    the A matrices sit one below the other (rank rows each) and the B matrices side by side
    along the output rows, exactly as SGLang's pool loader writes them.
    """
    pool = lora_manager.memory_pool
    out = []
    for name, shape in shapes.items():
        match = LORA_WEIGHT.search(name)
        if match is None:
            raise RuntimeError(f"adapter tensor {name}: not a LoRA weight of a supported projection")
        layer, projection, which = int(match[1]), match[2], match[3]
        module_name, stack = LORA_STACKS[projection]
        index = stack.index(projection)
        owner = [m for key, m in lora_manager.lora_modules[layer].items() if key.endswith("." + module_name)]
        if which == "A":
            rank = shape[0]
            view = pool.A_buffer[module_name][layer][slot, index * rank : (index + 1) * rank, :]
        else:
            rank = shape[1]
            start = sum(_block_rows(config, OUTPUT_BLOCK[p]) for p in stack[:index])
            view = pool.B_buffer[module_name][layer][slot, start : start + shape[0], :rank]
        if len(owner) != 1 or tuple(view.shape) != tuple(shape):
            raise RuntimeError(f"adapter tensor {name} {tuple(shape)}: SGLang's pool has {tuple(view.shape)} there")
        out.append((name, view, owner))
    return out


class EngineMeZO:
    """The MeZO state of one scheduler process.

    `tensors` are [(name, tensor view, owner modules)]; `reference` is the safetensors
    file(s) the views must equal at start-up (the checkpoint, or the adapter).
    """

    def __init__(self, tensors: list, kind: str, patterns, reference: list, residency=None):
        if patterns:
            regexes = [re.compile(p) for p in patterns]
            tensors = [t for t in tensors if any(r.search(t[0]) for r in regexes)]
        self.versions = WeightVersions()
        self.kind = kind
        self.tensors = [
            TrainableTensor(name, view, owners, decay=weight_decay_applies(name, view))
            for name, view, owners in tensors
        ]
        self.perturbation = ModuleScopedPerturbation(self.tensors, kind, self.versions)
        self.scope = contextlib.ExitStack()
        self.reference = reference
        self.residency = residency  # () -> raises when the trained tensors moved (LoRA eviction)

    def check_resident(self) -> None:
        if self.residency is not None:
            self.residency()

    def self_test(self) -> dict:
        """Every trainable tensor must equal the reference file's tensor of that name, bit for bit."""
        from safetensors import safe_open

        files = self.reference
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
                    checked += 1
                    if not same_bits(st.get_tensor(key), names[key].param):
                        mismatched.append(key)
        return {"checked": checked, "mismatched": mismatched, "missing": sorted(set(names) - found)}

    def checksum(self) -> dict:
        return {t.name: tensor_digest(t.param) for t in self.tensors}


# The only places engine tensors (on whatever device the engine runs) meet host memory:
# `same_bits` here and `primitives.host_bytes`.
def same_bits(reference: torch.Tensor, tensor: torch.Tensor) -> bool:
    """Whether `tensor` holds exactly `reference` (a host tensor, cast to its dtype), bit for
    bit, compared on `tensor`'s device (NaN payloads and the sign of zero count)."""
    if tuple(reference.shape) != tuple(tensor.shape):
        return False
    expected = reference.to(device=tensor.device, dtype=tensor.dtype).contiguous()
    return torch.equal(expected.view(torch.uint8), tensor.detach().contiguous().view(torch.uint8))


# ----------------------------------------------------------------------------- RPC methods
def _acknowledged(method):
    """An RPC method that reports its outcome to the caller: ``{"ok": true, "result": ...}`` or
    ``{"ok": false, "error": ...}`` as JSON at `ack_path`. Upstream's `collective_rpc` returns
    nothing and signals a failure only by an ``assert`` (gone under ``python -O``): the
    caller reads this instead."""

    @functools.wraps(method)
    def acknowledging(self, ack_path: str, **kwargs):
        try:
            result = method(self, **kwargs)
        except BaseException as error:
            write_json_atomically(ack_path, {"ok": False, "error": f"{type(error).__name__}: {error}"})
            raise
        write_json_atomically(ack_path, {"ok": True, "result": result})

    return acknowledging


# Bound to sglang's Scheduler by `register`; `self` is the Scheduler.
def mezo_setup(self, kind: str, patterns, model_path: str, lora_name=None, adapter_path=None):
    runner = self.tp_worker.model_runner
    hf_config = runner.model_config.hf_config
    if lora_name is None:
        tensors = logical_tensors(runner.model, hf_config)
        state = EngineMeZO(tensors, kind, patterns, sorted(Path(model_path).glob("*.safetensors")))
    else:
        from safetensors import safe_open

        manager = runner.lora_manager
        lora_id = next(i for i, ref in manager.lora_refs.items() if ref.lora_name == lora_name)
        adapter_file = Path(adapter_path) / "adapter_model.safetensors"
        with safe_open(str(adapter_file), framework="pt") as st:
            shapes = {key: tuple(st.get_slice(key).get_shape()) for key in st.keys()}
        slot = manager.memory_pool.uid_to_buffer_id.get(lora_id)
        if slot is None:
            raise RuntimeError(f"LoRA adapter {lora_name!r} is not resident in SGLang's LoRA memory pool")
        tensors = lora_pool_tensors(manager, slot, shapes, hf_config)

        def residency():
            if manager.memory_pool.uid_to_buffer_id.get(lora_id) != slot:
                raise RuntimeError(f"LoRA adapter {lora_name!r} left pool slot {slot}: its trained values are lost")

        state = EngineMeZO(tensors, kind, patterns, [adapter_file], residency)
    self._mezo = state
    report = state.self_test()
    report["tensors"] = [[t.name, list(t.param.shape)] for t in state.tensors]
    return report


def mezo_begin(self, seed: int, scale: float):
    self._mezo.check_resident()
    self._mezo.scope.enter_context(self._mezo.perturbation.scope(int(seed), float(scale)))


def mezo_end(self):
    self._mezo.scope.close()


def mezo_update(self, terms, lr: float, weight_decay: float, momentum: float):
    state = self._mezo
    state.check_resident()
    plan = prepare_update(state.tensors, [(int(s), float(g)) for s, g in terms], lr, weight_decay, momentum)
    commit_update(state.tensors, plan, state.kind, state.versions)


def mezo_checksum(self):
    return self._mezo.checksum()


def mezo_load(self, path: str):
    """Loads trainable tensors (HF names) from a safetensors file into the engine, in place."""
    from safetensors.torch import load_file

    weights = load_file(path)
    require_all([t.name for t in self._mezo.tensors], weights)
    self._mezo.check_resident()
    with torch.no_grad():
        for t in self._mezo.tensors:
            t.param.copy_(weights[t.name])
            for m in t.owners:
                self._mezo.versions.bump(m)


def mezo_save(self, output_path: str):
    """Writes the trainable tensors (HF or peft names) to a safetensors file."""
    from safetensors.torch import save_file

    self._mezo.check_resident()
    save_file({t.name: t.param.detach().to("cpu", copy=True).contiguous() for t in self._mezo.tensors}, output_path)


RPC_METHODS = {
    f.__name__: _acknowledged(f)
    for f in (mezo_setup, mezo_begin, mezo_end, mezo_update, mezo_checksum, mezo_load, mezo_save)
}


def register() -> None:
    """SGLang plugin entry point: adds the MeZO RPC methods to the Scheduler."""
    from sglang.srt.managers.scheduler import Scheduler

    for name, fn in RPC_METHODS.items():
        setattr(Scheduler, name, fn)
