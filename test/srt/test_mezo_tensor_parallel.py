"""MeZO across tensor-parallel shards, in this process: the engine plugin's shard maps against
upstream SGLang's own weight loaders and LoRA slicing, and updates of shards against the
unsharded update. (Real tensor-parallel engines: `test_mezo_sglang.TestTensorParallelEngine`.)

Upstream's loaders are the ground truth: `mezo_testing.sglang_model_on_rank` builds SGLang's
model as rank r of T holds it, so every shape is checked: KV heads replicated across ranks
(GPUs), and heads and intermediate rows padded where they do not divide by T (upstream's
CPU engine). Canaries: a rank-blind map, z drawn at a shard's local offsets, views that
take in the padding.

Run as ``pytest test/srt/test_mezo_tensor_parallel.py`` or ``python3 test/srt/test_mezo_tensor_parallel.py``.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
import types
import unittest
from pathlib import Path
from unittest import mock

import torch
from mezo_testing import sglang_model_on_rank, sglang_rank, smollm2_shaped, tiny_llama, tiny_tokenizer

from sglang.srt.mezo.backends.engine_launch import cpu_thread_binding
from sglang.srt.mezo.backends.engine_plugin import EngineMeZO
from sglang.srt.mezo.backends.lora_pool import LORA_STACKS, engine_adapter, lora_placement
from sglang.srt.mezo.backends.shard_maps import EngineTensor, TensorParallel, logical_tensors, split_sizes
from sglang.srt.mezo.config import MeZOConfig
from sglang.srt.mezo.primitives import same_bits
from sglang.srt.mezo.sharding import ShardLayout, gather
from sglang.srt.mezo.trainer import MeZOTrainer
from sglang.srt.mezo.zo_sgd import commit_update, prepare_update


def tiny_qwen2_tied():
    """A Qwen2 with q/k/v biases (random: Qwen2 starts them at 0) and tied embeddings."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.02)
    return model


# name -> (HF model, tp size, as upstream's CPU engine holds it). Vocabulary 400 pads to 448
# rows: the last rank holds padding.
CASES = {
    "gqa": (lambda: tiny_llama(hidden=64, vocab_size=400, num_key_value_heads=2), 2, False),
    "kv_heads_replicated": (lambda: tiny_llama(hidden=64, vocab_size=400, num_key_value_heads=1), 2, False),
    "tp4": (lambda: tiny_llama(hidden=64, vocab_size=400, num_key_value_heads=2), 4, False),
    "qwen2_bias_tied": (tiny_qwen2_tied, 2, False),
    "cpu_padded_heads_and_rows": (lambda: smollm2_shaped(intermediate_size=100), 2, True),  # 100 -> 128 rows
    # 1 KV head on 4 ranks: padded to 4 KV and 16 query heads, ranks 1-3 hold padding only
    "cpu_padded_kv_heads": (lambda: tiny_llama(hidden=64, vocab_size=400, num_key_value_heads=1), 4, True),
}


def ranks(case: str):
    """(HF model, tp size, [SGLang model of each rank], the engine's model config)."""
    build, size, cpu_padding = CASES[case]
    hf = build()
    built = [sglang_model_on_rank(hf, rank, size, cpu_padding) for rank in range(size)]
    return hf, size, [model for model, _ in built], built[0][1]


def run_first_layer_linears(model, pre_hook) -> None:
    """Runs each linear layer of an SGLang model's first decoder layer once on random input,
    with `pre_hook` as a forward pre-hook (registered after a perturbation's own, so it sees
    the perturbed weights), each rank's partial sum (no process group here)."""
    layer = model.model.layers[0]
    generator = torch.Generator().manual_seed(0)
    for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        linear.register_forward_pre_hook(pre_hook)
        linear.reduce_results = False
        linear(torch.randn(2, getattr(linear, "input_size_per_partition", linear.input_size), generator=generator))


class TestShardMaps(unittest.TestCase):
    """`logical_tensors` and `lora_placement` against upstream's loaders and LoRA slicing."""

    @classmethod
    def setUpClass(cls):
        cls.models = {case: ranks(case) for case in CASES}

    def test_every_shard_is_its_part_of_the_checkpoint(self):
        """On every rank of every shape each engine view equals its layout's part of the HF
        tensor, bit for bit, and the ranks' views gather to the HF tensors (every element
        held, replicas identical). Canary: a rank-blind map (every rank reads rank 0's
        blocks) misses on the sharded tensors."""
        for case, (hf, size, models, config) in self.models.items():
            with self.subTest(case=case):
                expected = {name: p.detach() for name, p in hf.named_parameters()}
                pieces: dict = {}
                for rank, model in enumerate(models):
                    tensors = logical_tensors(model, config, TensorParallel(rank, size))
                    self.assertEqual(sorted(t.name for t in tensors), sorted(expected))
                    for t in tensors:
                        self.assertTrue(same_bits(t.layout.take(expected[t.name]), t.view), f"rank {rank}: {t.name}")
                        pieces.setdefault(t.name, []).append((t.layout, t.view.clone()))
                for name, parts in pieces.items():
                    self.assertTrue(same_bits(expected[name], gather(name, parts)), name)
                embedding = next(t for t in logical_tensors(models[-1], config, TensorParallel(size - 1, size)))
                self.assertEqual(embedding.name, "model.embed_tokens.weight")
                padded_rows = dict(models[-1].named_parameters())[embedding.name].shape[0]
                self.assertLess(embedding.view.shape[0], padded_rows)  # the last rank's padding is left out
                blind = {t.name: t.layout for t in logical_tensors(models[0], config, TensorParallel(0, size))}
                last = logical_tensors(models[-1], config, TensorParallel(size - 1, size))
                missed = [t.name for t in last if not same_bits(blind[t.name].take(expected[t.name]), t.view)]
                self.assertIn("model.layers.0.self_attn.q_proj.weight", missed)
                self.assertIn("model.layers.0.mlp.down_proj.weight", missed)
                self.assertIn("model.embed_tokens.weight", missed)
                with self.assertRaisesRegex(RuntimeError, "split over other ranks than the engine's"):
                    logical_tensors(models[-1], config, TensorParallel(0, size))  # the plugin's own guard

    def test_lora_parts_are_upstream_slices(self):
        """For each LoRA-wrapped module, the pool rows MeZO trains on rank r (each peft tensor's
        part at its first row) equal upstream's ``slice_lora_a_weights`` /
        ``slice_lora_b_weights`` of the stacked peft matrices: B split by output rows for
        column-parallel modules (KV rows replicated with their heads), A split by input
        columns for row-parallel ones. Canary: the rank-blind map."""
        from sglang.srt.lora import layers

        wrappers = {
            "qkv_proj": (layers.QKVParallelLinearWithLoRA, "self_attn"),
            "gate_up_proj": (layers.MergedColumnParallelLinearWithLoRA, "mlp"),
            "o_proj": (layers.RowParallelLinearWithLoRA, "self_attn"),
            "down_proj": (layers.RowParallelLinearWithLoRA, "mlp"),
        }
        rank_r = 4
        for case in ("gqa", "kv_heads_replicated", "tp4", "cpu_padded_heads_and_rows"):
            hf, size, models, config = self.models[case]
            sizes = split_sizes(config)
            g = torch.Generator().manual_seed(0)
            for module, (wrapper, parent) in wrappers.items():
                projections = next(stack for name, stack in LORA_STACKS.values() if name == module)
                hf_layer = getattr(hf.model.layers[0], parent)
                a = {p: torch.randn(rank_r, getattr(hf_layer, p).in_features, generator=g) for p in projections}
                b = {p: torch.randn(getattr(hf_layer, p).out_features, rank_r, generator=g) for p in projections}
                peft_name = f"base_model.model.model.layers.0.{parent}.{{}}.lora_{{}}.weight".format
                # what the engine's LoRA loader receives: padded to its sizes (unchanged without padding)
                padded = engine_adapter(
                    {peft_name(p, w): t for p in projections for w, t in (("A", a[p]), ("B", b[p]))}, sizes
                )
                for rank, model in enumerate(models):
                    base = getattr(getattr(model.model.layers[0], parent), module)
                    owner = types.SimpleNamespace(base_layer=base)  # all the slicing methods read
                    upstream = {
                        w: getattr(wrapper, f"slice_lora_{w.lower()}_weights")(
                            owner, torch.cat([padded[peft_name(p, w)] for p in projections])
                        )
                        for w in ("A", "B")
                    }
                    maps = [(TensorParallel(rank, size), True)] + ([(TensorParallel(0, size), False)] if rank else [])
                    for tp, must_match in maps:
                        ours = {w: torch.zeros_like(upstream[w]) for w in ("A", "B")}  # padding: zeros
                        for p in projections:
                            for which, full in (("A", a[p]), ("B", b[p])):
                                place = lora_placement(peft_name(p, which), full.shape, config, tp)
                                rows, columns = place.layout.shape
                                ours[which][place.first_row : place.first_row + rows, :columns] = place.layout.take(
                                    full
                                )
                        matched = all(torch.equal(ours[w], upstream[w]) for w in ("A", "B"))
                        with self.subTest(case=case, module=module, rank=rank, blind=not must_match):
                            self.assertEqual(matched, must_match)

    def test_perturbed_shards_are_parts_of_the_perturbed_tensor(self):
        """While a linear layer runs inside a scope, each rank's shards of its weights hold
        their part of round(w + eps z) computed on the whole HF tensor by the whole-tensor
        kernel, bit for bit (fused q/k/v and gate/up by rows, o/down by columns, KV heads
        replicated too); after the call they are exactly w again. Canary: z drawn at the
        shard's local offsets."""
        from sglang.srt.mezo import kernels

        seed, eps = 21, 1e-2
        for case in ("gqa", "kv_heads_replicated", "cpu_padded_heads_and_rows"):
            hf, size, _, config = self.models[case]
            cpu_padding = CASES[case][2]
            expected = {}
            for name, p in hf.named_parameters():
                expected[name] = torch.empty_like(p.detach())
                kernels.axpy_direction_(expected[name], p.detach(), "gaussian", kernels.tensor_key(seed, name), eps)
            for local in (False, True):
                misses = checked = 0
                for rank in range(size):
                    model, _ = sglang_model_on_rank(hf, rank, size, cpu_padding)
                    tensors = logical_tensors(model, config, TensorParallel(rank, size))
                    layouts = {t.name: t.layout for t in tensors}
                    if local:
                        tensors = [t._replace(layout=ShardLayout.whole(tuple(t.view.shape))) for t in tensors]
                    state = EngineMeZO(tensors, "gaussian", [], [])
                    before = {t.name: t.param.clone() for t in state.tensors}
                    seen: dict = {}

                    def record(module, args, seen=seen, state=state):
                        seen.update({t.name: t.param.clone() for t in state.tensors if module in t.owners})

                    with sglang_rank(rank, size), state.perturbation.scope(seed, eps):
                        run_first_layer_linears(model, record)
                    for name, value in seen.items():
                        checked += 1
                        misses += not same_bits(layouts[name].take(expected[name]), value)
                    for t in state.tensors:
                        self.assertTrue(same_bits(before[t.name], t.param), f"{t.name} restored")
                with self.subTest(case=case, local_offsets=local):
                    self.assertEqual(checked, 7 * size)  # q, k, v, o, gate, up, down on every rank
                    if local:
                        self.assertGreater(misses, 0)
                    else:
                        self.assertEqual(misses, 0)

    def test_shard_updates_gather_to_the_unsharded_update(self):
        """A ZO-SGD update of two directions applied on every rank's shards gathers, bit for
        bit, to the transformers backend's update of the whole model: Gaussian with weight
        decay, Rademacher with momentum. Canary: z drawn at the shard's local offsets (the
        layout of a whole tensor of the shard's shape) writes other bits on the shards."""
        directions, lr = [(11, 0.7), (12, -0.3)], 1e-2
        for kind, weight_decay, momentum in (("gaussian", 0.1, 0.0), ("rademacher", 0.0, 0.5)):
            for case in ("gqa", "kv_heads_replicated", "qwen2_bias_tied", "cpu_padded_heads_and_rows"):
                hf, size, _, config = self.models[case]
                mezo = MeZOConfig(perturbation=kind, weight_decay=weight_decay, momentum=momentum, disable_tqdm=True)
                reference = MeZOTrainer(copy.deepcopy(hf), mezo)
                reference.backend.apply_update(directions, lr)
                expected = reference.backend.trainable_state()
                with self.subTest(kind=kind, case=case):
                    local_misses = 0
                    pieces: dict = {}
                    for local in (False, True):
                        for rank in range(size):
                            model, _ = sglang_model_on_rank(hf, rank, size, CASES[case][2])  # the update writes it
                            tensors = logical_tensors(model, config, TensorParallel(rank, size))
                            layouts = {t.name: t.layout for t in tensors}
                            if local:
                                tensors = [t._replace(layout=ShardLayout.whole(tuple(t.view.shape))) for t in tensors]
                            state = EngineMeZO(tensors, kind, [], [])
                            plan = prepare_update(state.tensors, directions, lr, weight_decay, momentum)
                            commit_update(state.tensors, plan, kind, state.versions)
                            for t in state.tensors:
                                part = layouts[t.name].take(expected[t.name])
                                if local:
                                    local_misses += not same_bits(part, t.param)
                                else:
                                    self.assertTrue(same_bits(part, t.param), f"rank {rank}: {t.name}")
                                    pieces.setdefault(t.name, []).append((layouts[t.name], t.param.clone()))
                    for name, parts in pieces.items():
                        self.assertTrue(same_bits(expected[name], gather(name, parts)), name)
                    self.assertGreater(local_misses, 0)

    def test_padding_is_never_perturbed_or_updated(self):
        """On upstream's CPU layout (heads and intermediate rows padded; with one KV head on four
        ranks, the q/k/v of ranks 1-3 are padding only) every element no view covers is padding and
        +0.0 after loading, stays +0.0 while each linear layer runs perturbed and after an
        update with weight decay and momentum, on the last rank (the one holding padding). (Padded q/k/v rows must stay zero: a padded
        head then attends to zero values, and padded gate/up rows give zero activations, so
        the padded input columns of o/down multiply zeros.) Canary: a padding-blind map that
        takes each engine tensor whole writes the padding."""
        directions, lr = [(5, 0.7), (6, -0.3)], 1e-2
        for case in ("cpu_padded_heads_and_rows", "cpu_padded_kv_heads"):
            hf, size, _, config = self.models[case]
            rank = size - 1  # the rank holding the padding
            for blind in (False, True):
                model, _ = sglang_model_on_rank(hf, rank, size, cpu_padding=True)
                tensors = logical_tensors(model, config, TensorParallel(rank, size))
                params = dict(model.named_parameters())
                padding = {}
                with torch.no_grad():
                    saved = {name: p.clone() for name, p in params.items()}
                    for t in tensors:
                        t.view.fill_(float("nan"))
                    for name, p in params.items():
                        padding[name] = ~torch.isnan(p)
                        p.copy_(saved[name])
                if blind:
                    modules = dict(model.named_modules())
                    tensors = [
                        EngineTensor(name, p.data, [modules[name.rpartition(".")[0]]], ShardLayout.whole(p.shape))
                        for name, p in params.items()
                    ]
                written = []

                def check(module=None, args=None, params=params, padding=padding, written=written):
                    for name, p in params.items():
                        if bool(p[padding[name]].ne(0).any()) or bool(p[padding[name]].signbit().any()):
                            written.append(name)  # not +0.0

                state = EngineMeZO(tensors, "gaussian", [], [])
                with sglang_rank(rank, size), state.perturbation.scope(3, 1.0):
                    run_first_layer_linears(model, check)
                plan = prepare_update(state.tensors, directions, lr, 0.1, 0.5)
                commit_update(state.tensors, plan, "gaussian", state.versions)
                check()
                with self.subTest(case=case, rank=rank, padding_blind=blind):
                    self.assertGreater(sum(int(m.sum()) for m in padding.values()), 0)
                    if blind:
                        self.assertIn("model.layers.0.self_attn.qkv_proj.weight", written)
                    else:
                        self.assertEqual(written, [])


class TestShardKernels(unittest.TestCase):
    def test_aligned_row_shards_take_the_fast_kernel_with_their_offset(self):
        """A block of rows starting on a 64-element boundary of the unsharded tensor is
        written by numba from that offset (the reference kernel is not called); unaligned
        rows and columns by the reference. Each equals its part of the whole tensor's write
        (perturbation and a ZO-SGD update with decay), bit for bit. Canary: numba drawing the
        aligned shard's z from element 0 writes other bits."""
        from sglang.srt.mezo import kernels
        from sglang.srt.mezo.kernels import numba_kernels
        from sglang.srt.mezo.kernels import reference as spec

        full = torch.randn(64, 96, generator=torch.Generator().manual_seed(3)) * 0.05
        keys, coefs, lr = [kernels.tensor_key(s, "w") for s in (1, 2)], [0.4, -1.1], 1e-2
        layouts = {  # first element's unsharded offset: 2 * 96 = 3 * 64 (aligned), 96 (not)
            "aligned rows": (ShardLayout.rows(full.shape, 2, 30), True),
            "unaligned rows": (ShardLayout.rows(full.shape, 1, 30), False),
            "columns": (ShardLayout.columns(full.shape, 32, 40), False),
        }
        for kind in ("gaussian", "rademacher"):
            perturbed, updated = full.clone(), full.clone()
            kernels.axpy_direction_(perturbed, perturbed, kind, keys[0], 1e-3)
            kernels.update_([kernels.UpdateTarget(updated, None, keys, 0.1)], kind, coefs, lr)
            for case, (layout, fast) in layouts.items():
                with self.subTest(kind=kind, case=case):
                    guard = mock.patch.object(spec, "axpy_", side_effect=AssertionError("reference called"))
                    shard, backup = layout.take(full).clone(memory_format=torch.contiguous_format), torch.empty(
                        layout.shape
                    )
                    with guard if fast else contextlib.nullcontext():
                        kernels.axpy_direction_(shard, shard, kind, keys[0], 1e-3, save=backup, layout=layout)
                    self.assertTrue(same_bits(layout.take(perturbed), shard))
                    self.assertTrue(same_bits(layout.take(full), backup))
                    shard = layout.take(full).clone(memory_format=torch.contiguous_format)
                    kernels.update_([kernels.UpdateTarget(shard, None, keys, 0.1, layout)], kind, coefs, lr)
                    self.assertTrue(same_bits(layout.take(updated), shard))
            layout = layouts["aligned rows"][0]
            shard = layout.take(full).clone(memory_format=torch.contiguous_format)
            numba_kernels.axpy_(shard, shard, kind, keys[0], spec.effective_alpha(kind, shard.dtype, 1e-3))
            self.assertFalse(same_bits(layout.take(perturbed), shard))


class TestTensorParallelPlumbing(unittest.TestCase):
    def test_cpu_thread_binding_gives_each_rank_its_own_cores(self):
        self.assertEqual(cpu_thread_binding(2, [0, 1]), "0|1")
        self.assertEqual(cpu_thread_binding(2, [4, 5, 6, 7]), "4,5|6,7")
        self.assertEqual(cpu_thread_binding(2, [0, 1, 2]), "0|1")  # equal sets; the spare core stays free
        with self.assertRaisesRegex(ValueError, r"tp_size=3 on CPU needs at least one core per rank; .* has 2"):
            cpu_thread_binding(3, [0, 1])

    def test_bad_tensor_parallel_settings_are_named(self):
        with self.assertRaisesRegex(ValueError, r"--tp-size 2 \(MeZOConfig.tp_size\): .*backend='sglang'"):
            MeZOConfig(tp_size=2)
        with self.assertRaisesRegex(ValueError, r"--tp-size 0 \(MeZOConfig.tp_size\): must be >= 1"):
            MeZOConfig(tp_size=0, backend="sglang")
        config = tiny_llama(hidden=64).config  # 4 query heads
        with self.assertRaisesRegex(ValueError, r"4 q heads do not split evenly over tp_size=3"):
            TensorParallel(1, 3).block(split_sizes(config), "q")

    def test_split_sizes_of_configs_without_every_block(self):
        """A config without a KV head count (multi-head attention) or an intermediate size
        (GPT-2 names it n_inner) gives the blocks it has: the shard maps of such a model's
        unfused tensors must not fail on the absent ones."""
        from transformers import GPT2Config

        sizes = split_sizes(GPT2Config(n_embd=64, n_head=4))
        self.assertEqual(sizes, {"q": [4, 4, 16], "kv": [4, 4, 16]})
        with self.assertRaisesRegex(RuntimeError, "the model config has no intermediate_size"):
            TensorParallel(0, 2).block(sizes, "ffn")

    def test_engines_mezo_cannot_reach_are_refused(self):
        """Engines with processes MeZO cannot reach or map (data-parallel replicas, which no
        collective_rpc reaches; attention data parallelism; pipeline stages; other nodes)."""
        from sglang.srt.mezo.backends.sglang_backend import SGLangBackend

        supported = dict(tp_size=2, dp_size=1, enable_dp_attention=False, pp_size=1, nnodes=1)
        for name, value in (("dp_size", 2), ("enable_dp_attention", True), ("pp_size", 2), ("nnodes", 2)):
            engine = types.SimpleNamespace(server_args=types.SimpleNamespace(**{**supported, name: value}))
            with self.assertRaisesRegex(ValueError, rf"an SGLang engine with {name}={value}: MeZO drives"):
                SGLangBackend(engine, MeZOConfig(), "unused")

    def test_the_main_job_starts_the_engine_with_the_configured_tp_size(self):
        """``--backend sglang --tp-size 2`` reaches ``launch_engine`` (the engine itself, the heavy
        loader, is mocked here; `test_mezo_sglang.TestTensorParallelEngine` trains on a real one)."""
        from sglang.srt import mezo_trainer
        from sglang.srt.mezo import recipe
        from sglang.srt.mezo.backends import engine_launch, sglang_backend

        with (
            tempfile.TemporaryDirectory() as out,
            mock.patch.object(engine_launch, "launch_engine") as launch,
            mock.patch.object(engine_launch, "EngineCrashWatch"),
            mock.patch.object(sglang_backend, "SGLangBackend") as backend,
        ):
            tiny_llama().save_pretrained(Path(out) / "tiny")
            config = mezo_trainer.parse_args(["--backend", "sglang", "--tp-size", "2", "--model", f"{out}/tiny"])
            backend.return_value.tp_size = 2
            recipe.build_trainer(config, None, tiny_tokenizer(), Path(out))
        self.assertEqual(launch.call_args.kwargs["tp_size"], 2)

    def test_gathering_refuses_diverged_replicas_and_missing_elements(self):
        whole = ShardLayout.whole((2, 3))
        with self.assertRaisesRegex(RuntimeError, "w: tensor-parallel ranks hold different values"):
            gather("w", [(whole, torch.zeros(2, 3)), (whole, torch.full((2, 3), -0.0))])
        top = ShardLayout.rows((2, 3), 0, 1)
        with self.assertRaisesRegex(RuntimeError, "w: 3 elements are held by no tensor-parallel rank"):
            gather("w", [(top, torch.zeros(1, 3))])


if __name__ == "__main__":
    unittest.main(verbosity=2)
