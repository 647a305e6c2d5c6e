"""Starting an upstream `sglang.Engine` for MeZO, and noticing when its processes die.

`launch_engine` starts one on a GPU or a CPU (CPU defaults, ranks bound to disjoint core
sets, import-only stand-ins in its spawned processes, a TorchInductor cache per vector
ISA); a process that dies during start-up raises `EngineCrashed` in the caller, and
`EngineCrashWatch` turns one that dies later into `EngineCrashed` at the call waiting on
it (upstream would kill the caller).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import types
from pathlib import Path
from typing import Optional

import torch

from sglang.srt.mezo.config import MeZOConfig, split_list

BOOTSTRAP_MODULE = "sglang.srt.mezo.backends.engine_bootstrap"

CPU_ENGINE_DEFAULTS = dict(
    device="cpu",
    attention_backend="torch_native",
    mem_fraction_static=0.05,
    max_total_tokens=8192,
    skip_tokenizer_init=True,
    log_level="error",
    sleep_on_idle=True,
)


# upstream's per-rank CPU core sets: "cores of rank 0|cores of rank 1|..."
THREAD_BINDING = "SGLANG_CPU_OMP_THREADS_BIND"


def generation_engine_args(config: MeZOConfig) -> dict:
    """`sglang.Engine` arguments the reward objective's sampling needs: the custom logit
    processor that applies the shared seeded rule (`engine_sampling`); {} otherwise (the
    option lets clients send code to the engine, so it is on only where it is used)."""
    return {"enable_custom_logit_processor": True} if config.objective == "reward" else {}


def lora_engine_args(config: MeZOConfig) -> dict:
    """`sglang.Engine` arguments that serve `config`'s LoRA adapter ({} without LoRA).

    Two pool slots: a pinned adapter may not take the last one (SGLang keeps one for base
    requests); plus one per population slot where the step's points run as LoRA slots
    (`lora_population.runs_population`). The rank is the adapter's, so pool slots hold it
    without padding.
    """
    from sglang.srt.mezo.backends.lora_population import runs_population, slots_per_step

    if config.peft != "lora":
        return {}
    args = dict(
        enable_lora=True,
        max_lora_rank=config.lora_rank,
        lora_target_modules=split_list(config.lora_target_modules),
        max_loras_per_batch=2 + (slots_per_step(config) if runs_population(config) else 0),
    )
    if config.torch_device().type == "cpu":
        args["lora_backend"] = "torch_native"  # the triton and csgmv LoRA backends need a GPU
    return args


class EngineCrashed(RuntimeError):
    """An SGLang engine process died (during start-up, or while serving a request once
    `EngineCrashWatch` watches the engine); raised in the trainer instead of killing it."""


class EngineCrashWatch:
    """Turns a scheduler that dies after start-up into `EngineCrashed` at the engine call
    that was waiting for it.

    A dying scheduler SIGQUITs its parent; upstream's running-phase handler (installed on
    the engine's event loop with its first request) then kills the whole process tree,
    the trainer included. The watch creates that loop now and replaces the handler with
    one that stops the loop: the call waiting on it returns, and `calls` reports the crash.
    (Only in the main thread, where upstream installs its handler too; an RPC waiting on a
    dead scheduler is not on the loop and is not covered.)
    """

    def __init__(self, engine):
        self.engine = engine
        self.died = False
        if threading.current_thread() is threading.main_thread():

            async def create_handle_loop():  # on the engine's loop, as its first request would
                engine.tokenizer_manager.auto_create_handle_loop()  # upstream's handler goes in here ...

            engine.loop.run_until_complete(create_handle_loop())
            engine.loop.add_signal_handler(signal.SIGQUIT, self._scheduler_died)  # ... and is replaced

    def _scheduler_died(self) -> None:
        self.died = True
        self.engine.loop.stop()

    @contextlib.contextmanager
    def calls(self):
        """An engine call; raises `EngineCrashed` if a scheduler died meanwhile (the engine's
        other processes are stopped: the engine cannot serve again)."""
        try:
            yield
        except RuntimeError as error:
            if not self.died:
                raise
            _stop_engine_processes(exclude=set())
            raise EngineCrashed(
                "an SGLang scheduler process died while serving a request (its traceback is above); the weights "
                "it held are gone with it: continue from the last checkpoint (--save-steps sets how often)"
            ) from error


def _raise_engine_crashed(signum, frame):
    raise EngineCrashed("an SGLang engine process died (it sent SIGQUIT); see its log above")


@contextlib.contextmanager
def _children_bootstrap():
    """SGLang spawns its processes with multiprocessing 'spawn', which re-runs the parent's
    ``__main__`` in each child before unpickling the target. Upstream's scheduler imports
    torchvision while unpickling, so the CPU stand-ins must be active first: during the
    launch, ``__main__`` is presented as `engine_bootstrap`, which installs them (and
    re-runs nothing of the user's script)."""
    real_main = sys.modules["__main__"]
    stand_in = types.ModuleType("__main__")
    stand_in.__spec__ = types.SimpleNamespace(name=BOOTSTRAP_MODULE)
    sys.modules["__main__"] = stand_in
    try:
        yield
    finally:
        sys.modules["__main__"] = real_main


@contextlib.contextmanager
def _environment(values: dict):
    """`values` set in os.environ within the block (inherited by processes started there)."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def cpu_thread_binding(tp_size: int, cores: Optional[list] = None) -> str:
    """SGLANG_CPU_OMP_THREADS_BIND for `tp_size` CPU ranks: this process's cores (or `cores`)
    split into equal consecutive sets, one per rank, e.g. ``"0|1"`` or ``"0,1,2,3|4,5,6,7"``.
    (Without it upstream binds one rank per NUMA node and refuses more ranks than nodes.)"""
    cores = sorted(os.sched_getaffinity(0) if cores is None else cores)
    per_rank = len(cores) // tp_size
    if per_rank == 0:
        raise ValueError(
            f"tp_size={tp_size} on CPU needs at least one core per rank; this process has {len(cores)} "
            f"(to let ranks share cores, set {THREAD_BINDING} yourself, e.g. '0|1|0')"
        )
    sets = [cores[r * per_rank : (r + 1) * per_rank] for r in range(tp_size)]
    return "|".join(",".join(str(c) for c in s) for s in sets)


INDUCTOR_CACHE = "TORCHINDUCTOR_CACHE_DIR"


def inductor_cache_for_this_isa(base: Optional[str] = None) -> str:
    """The TorchInductor cache directory for a CPU engine's processes: a subdirectory of
    `base` (default: $TORCHINDUCTOR_CACHE_DIR, else inductor's own) named after the vector
    ISA ATen runs here (``ATEN_CPU_CAPABILITY``, else what the CPU supports).

    Upstream compiles small functions with torch.compile (e.g. the vocabulary-parallel
    embedding's input mask). Inductor's FX-graph cache does not key on that ISA: C++ generated
    for AVX-512 (loops stepping 16 int64 lanes) was served to a process under
    ``ATEN_CPU_CAPABILITY=avx2``, where the same source compiles to 8-lane vectors and leaves
    every other block of 8 outputs unwritten; the tensor-parallel embedding then read
    garbage token ids (``IndexError: index out of range``). One cache per ISA keeps what was
    generated for one ISA from ever serving another.
    """
    if base is None:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        base = os.environ.get(INDUCTOR_CACHE) or default_cache_dir()
    return str(Path(base) / f"isa-{torch.backends.cpu.get_cpu_capability().lower()}")


def launch_engine(model_path: str, dtype: str = "float32", device: str = "auto", tp_size: int = 1, **overrides):
    """Starts an `sglang.Engine` for MeZO on `device` (``auto``: cuda when available) with
    `tp_size` tensor-parallel ranks; on a CPU with the defaults that run there, and with
    ranks bound to disjoint core sets (`cpu_thread_binding`) unless the user bound them.

    An engine process that crashes during start-up raises `EngineCrashed` in the caller
    instead of killing it, and the engine processes left behind are stopped.
    """
    import psutil

    import sglang
    from sglang.srt.mezo.backends import cpu_standins

    cpu_standins.install()
    kwargs = dict(model_path=model_path, dtype=dtype, tp_size=tp_size, custom_sigquit_handler=_raise_engine_crashed)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    environment = {}  # for the engine's processes, while they start
    if torch.device(device).type == "cpu":
        kwargs.update(CPU_ENGINE_DEFAULTS)
        environment[INDUCTOR_CACHE] = inductor_cache_for_this_isa()
        if tp_size > 1 and not os.environ.get(THREAD_BINDING):
            environment[THREAD_BINDING] = cpu_thread_binding(tp_size)
    else:
        kwargs["device"] = torch.device(device).type
    kwargs.update(overrides)
    processes_before = {child.pid for child in psutil.Process().children(recursive=True)}
    contexts_before = {id(c) for c in _zmq_contexts()}
    try:
        with _children_bootstrap(), _environment(environment):
            return sglang.Engine(**kwargs)
    except EngineCrashed:
        _stop_engine_processes(exclude=processes_before)
        # The half-built engine's ZMQ sockets hold messages for the dead scheduler; with
        # the default infinite linger, terminating their context (at garbage collection)
        # would block the caller forever.
        for context in _zmq_contexts():
            if id(context) not in contexts_before:
                context.destroy(linger=0)
        raise


def _zmq_contexts() -> list:
    import gc

    import zmq

    return [o for o in gc.get_objects() if isinstance(o, zmq.Context)]


def _stop_engine_processes(exclude: set) -> None:
    """Kills and reaps SGLang's processes (titled ``sglang::...``) started since `exclude`."""
    import psutil

    engine_processes = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.pid not in exclude and child.name().startswith("sglang::"):
                engine_processes.append(child)
        except psutil.NoSuchProcess:
            continue
    for child in engine_processes:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(engine_processes, timeout=10)
