"""Internals of the MeZO trainer; the public API is `sglang.srt.mezo_trainer`.

Where things live (imports run downward only: entry point -> recipe -> preflight and
trainer -> backends -> perturbation -> zo_sgd -> kernels -> sharding; config sits below
them and imports data, estimators, kernels and structured_directions; usage_errors and
primitives import nothing of the project):

* `recipe`: the main job (setup, train, evaluate, save; a failed start undone, a late
  failure checkpointed); `preflight`: a run's inputs checked before any work;
  `usage_errors`: a user's mistake as one line (the CLIs exit 2);
* `trainer`: the step (the estimator's passes, one update) and the train / evaluate loops;
* `estimators`: how a step turns losses at seeded perturbations into update terms (MeZO's
  two points, FZOO's normalised one-sided differences); `structured_directions`: masked
  (Sparse-MeZO) and low-rank (LOZO) z drawn from the same seeds;
* `lr_search`: ``--lr auto``, the rate from the loss's curvature along seeded z; `guard`:
  the divergence guard's rule (held-back checks keep the best weights, a rise restores
  them, the run ends on them);
* `config`: `MeZOConfig`, one help string and one CLI flag per field, and the defaults;
* `backends/`: the `Backend` protocol and its two implementations, transformers in this
  process and an upstream SGLang engine: its launch (`engine_launch`; `engine_bootstrap`
  is the spawned processes' first module), the checkpoint it serves and the trained model
  written from it (`engine_checkpoint`), the plugin that perturbs inside it
  (`engine_plugin`, with `shard_maps` and `lora_pool`) and the RPC files both sides read
  (`engine_protocol`);
* `perturbation`: how a perturbation is scoped and undone exactly (per-unit copies
  swapped in while a unit runs), `restore_log` the whole-model restore log for Rademacher
  on float32 CPU weights; `zo_sgd`: the atomic two-phase update;
* `kernels/`: z and every write made with it: the torch reference (the specification),
  numba for float32 CPU tensors, Triton for GPUs, one dispatch;
* `sharding`: where a tensor-parallel shard's elements sit in the unsharded tensor (z is
  drawn there), and gathering shards back;
* `kv_cache`: exact prompt-prefix sharing and frozen-layer reuse, keyed on weight versions;
* `objectives`: losses as (sum, count); `trainable`: which tensors train (peft, patterns)
  and each as the perturbation and the update see it (`TrainableTensor`);
* `rewards/`: the reward objective (`rewards.objective`), reward functions (``--reward``:
  loading and the checks of every output, the built-ins); `generation`: its settings,
  seeds and the transformers path; `sampling`: the seeded sampling rule both backends
  apply (`backends.engine_sampling` is SGLang's side);
* `data/`: sources, tokenization, the dataset, batching and data-parallel sharding;
* `checkpoint`, `replay`, `distributed`, `model_io` (loading, GGUF), `reporting`
  (metrics.jsonl, the loss plot), `output_dir` (one run per directory and its lock),
  `signals` (stopping after a step; Ctrl-C held during an update),
  `primitives` (digests, bitwise comparison, atomic writes), `official_mezo` (the official
  MeZO step, the baseline the benchmarks and tests measure against).
"""
