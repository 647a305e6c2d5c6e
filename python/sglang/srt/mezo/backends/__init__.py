"""MeZO's forward backends behind one interface (`base.Backend`).

* `transformers_backend`: any transformers causal LM in this process;
* `sglang_backend`: an upstream SGLang engine (tensor-parallel or not), its weights perturbed
  inside its processes, each rank its own shards, by `engine_plugin` (an SGLang plugin;
  `shard_maps` and `lora_pool` say where each tensor lives on a rank, `engine_protocol`
  holds the files the trainer and the engine exchange);
  `engine_launch` starts the engine and notices when its processes die; `engine_bootstrap`
  and `cpu_standins` let it start on a CPU-only machine.
"""

from sglang.srt.mezo.backends.base import Backend

__all__ = ["Backend"]
