"""Run as ``__main__`` of SGLang's spawned engine processes (see `engine_launch.launch_engine`).

multiprocessing's 'spawn' re-runs the parent's main module in every child before it
unpickles the process target; upstream's scheduler imports torchvision while unpickling,
so the CPU stand-ins are installed here, first. Pinned host memory (SGLang's LoRA path asks
for it) is made a plain allocation here too, and upstream's padding-aware weight loading
(heads that do not divide by tp_size) is selected, on CPU only and in these processes only.
"""

from sglang.srt.mezo.backends import cpu_standins

cpu_standins.install()
cpu_standins.neutralise_pin_memory()
cpu_standins.load_padded_shards()
