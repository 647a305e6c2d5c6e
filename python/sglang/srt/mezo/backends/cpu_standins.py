"""Import-only stand-ins that let upstream SGLang's engine import on a CPU-only machine.

Upstream SGLang imports a few GPU-stack modules at module level on code paths a CPU
engine never executes:

* ``torchvision`` (multimodal processors): PyPI's torchvision needs a CUDA torch build
  (several GB) and fails to import beside the CPU torch wheel.
* ``vllm._custom_ops`` (``RotaryEmbedding.__init__`` imports it on generic platforms but
  only calls it on CUDA).

`install()` registers, only when the real module cannot be found and CUDA is absent, a
finder that serves placeholder modules for exactly these names. Any attribute of a
placeholder is a placeholder class usable in annotations and default arguments; calling
or instantiating one raises ImportError naming the missing package, so nothing silently
computes wrong results. The CLI (``--backend sglang``) and the tests call `install()`.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

# root package -> the modules served under it (None: the root and every submodule). Only
# these: e.g. `vllm.logger` stays missing, so SGLang's `try: import ... except ImportError`
# probes keep seeing "not installed".
STANDINS = {"torchvision": None, "vllm": ("vllm", "vllm._custom_ops")}
STANDIN_ROOTS = tuple(STANDINS)


class _Placeholder(type):
    """A class whose attributes are placeholders and whose instantiation explains itself."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{cls.__name__}.{name}", (), {"_missing": cls._missing})

    def __call__(cls, *args, **kwargs):
        raise ImportError(f"{cls.__name__} is a CPU stand-in: install the real `{cls._missing}` to use it")


class _StandInModule(types.ModuleType):
    def __init__(self, name: str):
        super().__init__(name)
        self.__path__ = []  # a package, so any submodule imports too

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        root = self.__name__.split(".")[0]
        return _Placeholder(f"{self.__name__}.{name}", (), {"_missing": root})


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots):
        self.roots = tuple(roots)

    def find_spec(self, fullname, path=None, target=None):
        root = fullname.split(".")[0]
        if root in self.roots and (STANDINS[root] is None or fullname in STANDINS[root]):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StandInModule(spec.name)

    def exec_module(self, module):
        pass


def missing_roots() -> list:
    """The stand-in roots whose real package is not installed."""
    return [root for root in STANDIN_ROOTS if importlib.util.find_spec(root) is None]


def installed() -> bool:
    """Whether this process serves the stand-ins (`install` ran here and had something to do)."""
    return any(isinstance(f, _StandInFinder) for f in sys.meta_path)


def install() -> list:
    """Serves stand-ins for missing GPU-only modules on a CPU-only machine; returns their names."""
    import torch

    if torch.cuda.is_available():
        return []
    if installed():
        return [r for f in sys.meta_path if isinstance(f, _StandInFinder) for r in f.roots]
    roots = missing_roots()
    if roots:
        sys.meta_path.append(_StandInFinder(roots))
    return roots


_PINNING_FACTORIES = ("tensor", "empty", "zeros", "ones", "arange", "full")


def _unpinned(factory):
    def call(*args, pin_memory: bool = False, **kwargs):
        return factory(*args, **kwargs)

    call.__wrapped__ = factory
    return call


def neutralise_pin_memory() -> bool:
    """Makes ``pin_memory`` a plain host allocation when no accelerator can pin memory.

    SGLang's LoRA layers and its torch-native LoRA backend allocate their host-side index
    tensors with ``pin_memory=True`` (staging for a non-blocking copy to the GPU); without
    an accelerator torch raises instead. On CPU the staging copy is a host copy anyway, so
    unpinned memory computes the same. Called only in SGLang's spawned engine processes
    (`engine_bootstrap`): the trainer's own process keeps torch untouched.
    """
    import torch

    if torch.cuda.is_available() or getattr(torch.Tensor.pin_memory, "__mezo_unpinned__", False):
        return False
    for name in _PINNING_FACTORIES:
        setattr(torch, name, _unpinned(getattr(torch, name)))

    def pin_memory(self, device=None):
        return self.clone()  # pin_memory() returns a copy; so does this

    pin_memory.__mezo_unpinned__ = True
    torch.Tensor.pin_memory = pin_memory
    return True


def load_padded_shards() -> bool:
    """Lets upstream's linear layers load a checkpoint into the heads and rows its CPU engine
    pads, where no accelerator is present.

    Upstream's CPU engine pads attention heads, KV heads and the intermediate size that do
    not divide by tp_size (``adjust_config_with_unaligned_cpu_tp``); its linear layers' weight
    loaders fill such padded parameters (each rank's real rows, then zeros) only when
    ``sglang.srt.layers.linear._is_cpu`` is set, which upstream derives from
    ``SGLANG_USE_CPU_ENGINE=1``: a switch that also routes every layer to the sgl_kernel CPU
    build PyPI lacks. The module's flag alone selects the padding-aware loading and nothing
    else (in SGLang 0.5.23 only that module's weight loaders read it); without padding they
    load exactly as before. Called only in SGLang's spawned engine processes (`engine_bootstrap`).
    """
    import torch

    if torch.cuda.is_available():
        return False
    from sglang.srt.layers import linear

    linear._is_cpu = True
    return True
