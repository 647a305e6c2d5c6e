"""Run as ``__main__`` of SGLang's spawned engine processes (see `sglang_backend.launch_engine`).

multiprocessing's 'spawn' re-runs the parent's main module in every child before it
unpickles the process target; upstream's scheduler imports torchvision while unpickling,
so the CPU stand-ins are installed here, first.
"""

from sglang.srt.mezo import cpu_standins

cpu_standins.install()
