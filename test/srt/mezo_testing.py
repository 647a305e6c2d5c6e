"""Tiny real models and tokenizers for the MeZO tests: built from a config, no download."""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import math
import tempfile
import weakref
from typing import Optional
from unittest import mock

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "The movie was great and I loved it.",
    "The film was terrible, I hated every minute.",
    "Question: is the sky blue? Answer: yes",
    "Question: is fire cold? Answer: no",
    "Review: a wonderful, moving story. Sentiment: positive",
    "Review: dull and far too long. Sentiment: negative",
    "one two three four five six seven eight nine ten",
    "red green blue yellow black white orange purple",
] * 4

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@functools.lru_cache(maxsize=None)
def _trained_bpe(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (spacing matters, as in GPT-2/Llama-3) with a chat template."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_bpe(vocab_size)),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama_config(vocab_size: int = 384, layers: int = 2, hidden: int = 32, **overrides) -> LlamaConfig:
    values = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="eager",
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_llama(seed: int = 0, dtype=torch.float32, **config_overrides) -> LlamaForCausalLM:
    """A randomly initialised LlamaForCausalLM (real transformers model, no download)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config_overrides)).to(dtype)
    return model.eval()


def save_tiny_model(directory) -> None:
    """`tiny_llama()` and `tiny_tokenizer()` saved to `directory`: a model dir the CLI loads."""
    tiny_llama().save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)


def smollm2_shaped(**overrides) -> LlamaForCausalLM:
    """SmolLM2-135M's head layout (9 query and 3 KV heads) in miniature, with a vocabulary of
    400: on 2 CPU ranks upstream pads them to 12 and 4 heads and 448 vocabulary rows, so
    rank 1 holds 3 real query heads, 1 real KV head and 176 real vocabulary rows, each
    followed by zeros. The intermediate size (128, like SmolLM2's 1536 a multiple of 32 x
    tp_size) is not padded: upstream's CPU engine pads other sizes even at tp_size=1, and its
    own LoRA loader then refuses every adapter on the MLP."""
    values = dict(hidden=72, vocab_size=400, num_attention_heads=9, num_key_value_heads=3, head_dim=8,
                  intermediate_size=128)  # fmt: skip
    return tiny_llama(**{**values, **overrides})


# ----------------------------------------------------------------------------- tolerances
# Higham & Mary (2019), "A new approach to probabilistic rounding error analysis", Thm 2.4:
# with independent, mean-zero rounding errors, a computation that chains n roundings has
# relative error at most ~ lambda * sqrt(n) * u with probability >= 1 - 2n exp(-lambda^2 (1-u)^2 / 2).
# lambda = 7 and n ~ 1e3 fail with probability < 6e-8 per compared value (the worst-case
# bound n * u would hold always but is ~ 30x looser than any two CPU forwards ever differ).
PROBABILISTIC_LAMBDA = 7.0


def forward_reduction_length(config, tokens: int) -> int:
    """The roundings a causal LM's logit collects along its deepest path: per decoder layer
    the norm's sum of squares (hidden), q/k/v (hidden), scores (head_dim), scores x V (up to
    `tokens`), o (heads x head_dim), the second norm (hidden), gate/up (hidden), down
    (intermediate); then the final norm and the LM head (hidden each)."""
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    per_layer = 4 * hidden + head_dim + tokens + config.num_attention_heads * head_dim + config.intermediate_size
    return config.num_hidden_layers * per_layer + 2 * hidden


def rotary_angle_error(config, tokens: int) -> float:
    """The relative error rotary position embeddings add to a forward in any dtype:
    transformers computes the angles p f (f <= 1) and their cos and sin in float32 whatever
    the model's dtype, so each angle is off by up to (p + 2) float32 roundings (the product,
    cos/sin, the cast), moving q and k each that much relative, in every layer."""
    return config.num_hidden_layers * 2 * (tokens + 2) * 2.0**-24


def logprob_tolerance(model: torch.nn.Module, batch: dict) -> float:
    """How far two implementations of `model`'s forward in its dtype (other GEMM blocking, fused
    kernels, attention backends, ISAs, tensor-parallel partial sums) may put one labelled
    token's log-prob apart, derived rather than observed.

    Each logit z_j = sum_i h_i W_ji. An implementation's rounding errors reach it as a
    relative error of at most gamma = lambda sqrt(K) u on h (K = `forward_reduction_length`,
    every rounding upstream; u the unit roundoff of `model`'s dtype, 2^-24 in float32; plus
    the float32 rotary angles' `rotary_angle_error`) and
    on the LM head's own sum (a LoRA branch runs its sums beside the base's and adds one
    rounding per projection), so |dz_j| <= gamma S with
    S = max_j sum_i |h_i| |W_ji|, the logits' absolute scale at this token (the magnitude
    that grows as training moves the weights: hence relative, measured here at `model`'s
    current weights, in its own arithmetic: a scale needs no more digits). log p_t = z_t -
    logsumexp(z) moves by dz_t - sum_j p_j dz_j, at most 2 max_j |dz_j|; two
    implementations, each that far from exact: 4 gamma S.
    """
    head = model.get_output_embeddings().weight.detach().double().abs()
    scale, tokens = 0.0, 0
    with torch.no_grad():
        for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"].bool(), batch["labels"]):
            ids, labels = ids[mask], labels[mask]  # the row alone: no padding (it is NaN in float64)
            hidden = model(input_ids=ids[None], output_hidden_states=True).hidden_states[-1][0]
            predicts_label = labels[1:] != -100  # position p scores token p + 1
            per_position = (hidden[:-1][predicts_label].double().abs() @ head.T).amax(-1)  # S
            scale, tokens = max(scale, float(per_position.max())), max(tokens, int(ids.numel()))
    unit_roundoff = torch.finfo(next(model.parameters()).dtype).eps / 2
    gamma = PROBABILISTIC_LAMBDA * math.sqrt(forward_reduction_length(model.config, tokens)) * unit_roundoff
    gamma += rotary_angle_error(model.config, tokens)
    return 4 * gamma * scale


def candidate_loss_tolerance(token_tolerance: float) -> float:
    """Candidate cross-entropy from per-token log-probs within `token_tolerance`: each
    candidate's score (a mean of its tokens' log-probs) moves by at most the tolerance, and
    -log softmax(s)_gold = logsumexp(s) - s_gold by at most twice that; a batch mean keeps it."""
    return 2 * token_tolerance


def loss_tolerance(model: torch.nn.Module, batch: dict) -> float:
    """The tolerance of the default objective's value on `batch`: candidate cross-entropy
    (`candidate_loss_tolerance`) with candidates, else the mean completion NLL (a mean of
    per-token log-probs: the per-token tolerance)."""
    token = logprob_tolerance(model, batch)
    return candidate_loss_tolerance(token) if "is_gold" in batch else token


def candidate_batch(examples=4, candidates=3, seed=0, vocab=384, pad_side="right"):
    """Rows = prompt + one candidate, as the collator builds them (adjacent per example)."""
    g = torch.Generator().manual_seed(seed)
    rows, meta = [], []
    for e in range(examples):
        prompt = torch.randint(3, vocab, (5 + 2 * e,), generator=g).tolist()
        gold = e % candidates
        for c in range(candidates):
            cand = torch.randint(3, vocab, (1 + (c + e) % 3,), generator=g).tolist()
            rows.append((prompt + cand, [-100] * len(prompt) + cand))
            meta.append((e, c, c == gold, len(prompt)))
    width = max(len(r[0]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, (tokens, lab) in enumerate(rows):
        span = slice(0, len(tokens)) if pad_side == "right" else slice(width - len(tokens), width)
        ids[i, span], labels[i, span], mask[i, span] = torch.tensor(tokens), torch.tensor(lab), 1
    e, c, gold, plen = zip(*meta)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "example_id": torch.tensor(e),
        "candidate_id": torch.tensor(c),
        "is_gold": torch.tensor(gold),
        "prompt_length": torch.tensor(plen),
    }


def lm_batch(batch_size=4, length=12, prompt=6, seed=1, vocab=384) -> dict:
    """Random token rows whose last `length - prompt` tokens carry labels (seeded)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch_size, length), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def snapshot(model: torch.nn.Module) -> dict:
    """A copy of every parameter, for bit-exact comparisons."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bit_identical(testcase, model: torch.nn.Module, reference: dict) -> None:
    for name, p in model.named_parameters():
        ref = reference[name]
        same = torch.equal(p.detach().view(torch.uint8), ref.view(torch.uint8))
        testcase.assertTrue(same, f"{name} changed (max |diff| {(p.detach().double() - ref.double()).abs().max():.3g})")


class AllocationTracker(TorchDispatchMode):
    """Live and peak bytes of tensor memory allocated inside the block, seen op by op.

    Every torch op (factory, compute, copy) passes through this mode; an output whose
    storage is new is counted until that storage is freed (storages keep their Python
    object while alive, so a weak reference to it fires exactly on free). Storages of
    `baseline` tensors (the model's weights) are not counted, but freeing one counts as
    negative: the official MeZO pattern replaces each weight by a new tensor, and the old
    one's memory comes back. Memory that numpy allocates (the numba kernels' scratch) is
    not a tensor and not seen here.
    """

    def __init__(self, baseline=()):
        super().__init__()
        self.live = self.peak = 0
        self._counted: set = set()
        for t in baseline:
            storage = t.untyped_storage()
            weakref.finalize(storage, self._add, -storage.nbytes())

    def _add(self, nbytes: int) -> None:
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def _forget(self, key: int, nbytes: int) -> None:
        self._counted.discard(key)
        self._add(-nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)
                if key not in inputs and key not in self._counted:
                    self._counted.add(key)
                    self._add(storage.nbytes())
                    weakref.finalize(storage, self._forget, key, storage.nbytes())
        return out


def peak_bytes(fn, baseline=()) -> int:
    """Peak tensor bytes allocated while `fn()` runs, above what existed before (`AllocationTracker`)."""
    tracker = AllocationTracker(baseline)
    with tracker:
        fn()
    return tracker.peak


@contextlib.contextmanager
def perturbed_weights(trainer, seed: Optional[int], scale: float):
    """Within the block, `trainer`'s model holds ``w + scale z(seed)`` on its trainable tensors
    (the weights a pass at that seed and scale reads), written as a plain update of
    ``-scale`` at lr 1; after it, the weights (and momentum) are loaded back bit for bit."""
    if seed is None or not scale:
        yield trainer.model
        return
    config, backend = trainer.config, trainer.backend
    weights = {name: value.clone() for name, value in backend.trainable_state().items()}
    momentum = {name: buffer.clone() for name, buffer in backend.momentum_state().items()}
    decay_and_momentum = config.weight_decay, config.momentum
    config.weight_decay, config.momentum = 0.0, 0.0
    try:
        backend.apply_update([(seed, -scale)], lr=1.0)
        yield trainer.model
    finally:
        config.weight_decay, config.momentum = decay_and_momentum
        backend.load_trainable_state(weights)
        backend.load_momentum_state(momentum)


def tolerance_at(tolerance, trainer, batch: dict, seed: Optional[int], scale: float) -> float:
    """`tolerance` (model, batch -> float) at the weights ``w + scale z(seed)`` of `trainer`."""
    with perturbed_weights(trainer, seed, scale) as model:
        return tolerance(model, batch)


def follow_in_order(trainer, reference, batch: dict, order: str, tolerance=None) -> list:
    """Runs `order` ("e": evaluate, "s": step) on `trainer` and the same computations on
    `reference`: each step's L+ and L- at the step's seed, then the step's (seed, g) update
    applied to `reference` too, so both hold the same weights. Returns (value, reference
    value) pairs: every eval loss, L+ and L-; with `tolerance` (model, batch -> float),
    (value, reference value, tolerance at the weights that pass read) triples."""
    from sglang.srt.mezo.objectives import make_objective

    def at(seed, scale) -> tuple:
        return () if tolerance is None else (tolerance_at(tolerance, reference, batch, seed, scale),)

    pairs = []
    for event in order:
        if event == "e":
            pairs.append((trainer.evaluate([batch])["loss"], reference.evaluate([batch])["loss"], *at(None, 0.0)))
            continue
        out = trainer.step(batch)
        objective, eps = make_objective("auto", batch), trainer.config.epsilon
        pairs.append((out.loss_perturbed, reference._loss(objective, batch, out.seed, eps), *at(out.seed, eps)))
        pairs.append((out.loss_baseline, reference._loss(objective, batch, out.seed, -eps), *at(out.seed, -eps)))
        reference.backend.apply_update(out.applied, out.lr)
    return pairs


# Upstream model classes for the tiny test models (by HF architecture).
SGLANG_MODEL_MODULES = {"LlamaForCausalLM": "sglang.srt.models.llama", "Qwen2ForCausalLM": "sglang.srt.models.qwen2"}


@contextlib.contextmanager
def sglang_rank(rank: int, size: int):
    """Within this block, upstream SGLang's layers are built and run as tensor-parallel rank
    `rank` of `size`, in this process (no engine, no process group).

    SGLang 0.5.23 builds its layers from a published parallel context: a ServerArgs with the
    tp size, and this rank's place in it. Its linear layers read the rank from the TP
    group's ``rank_in_group``/``world_size``; the logits processor only stores the group's
    communicators (none here: nothing is communicated), and the model asks for a pipeline
    group of one stage.
    """
    import types

    from sglang.srt.mezo.backends import cpu_standins

    cpu_standins.install()
    from sglang.srt.runtime_context import get_context, get_parallel

    tp_group = types.SimpleNamespace(world_size=size, rank_in_group=rank, cpu_group=None, device_group=None)
    pipeline = types.SimpleNamespace(is_first_rank=True, is_last_rank=True, world_size=1, rank_in_group=0)
    with get_context().override_server_args(tp_size=size, device="cpu"), get_parallel().override(
        tp_rank=rank, attn_tp_rank=rank, tp_group=tp_group, attn_tp_group=None, moe_tp_group=None,
        pp_group=pipeline, pp_rank=0,
    ):  # fmt: skip
        yield


def sglang_cpu_config(hf_model: torch.nn.Module, size: int):
    """The model config upstream's CPU engine runs `hf_model` with on `size` tensor-parallel
    ranks: heads, KV heads and intermediate rows that do not divide by `size` padded, the
    checkpoint's counts kept as ``original_*`` (upstream's own
    ``adjust_config_with_unaligned_cpu_tp``, applied as its model runner does)."""
    from sglang.srt.mezo.backends import cpu_standins

    cpu_standins.install()
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.configs.update_config import adjust_config_with_unaligned_cpu_tp

    config = copy.deepcopy(hf_model.config)
    config.architectures = [type(hf_model).__name__]
    with tempfile.TemporaryDirectory() as model_dir:
        config.save_pretrained(model_dir)
        model_config = ModelConfig(model_dir)
    return adjust_config_with_unaligned_cpu_tp(model_config, LoadConfig(), size).hf_config


def sglang_model_on_rank(hf_model: torch.nn.Module, rank: int, size: int, cpu_padding: bool = False):
    """Upstream SGLang's model of `hf_model` as tensor-parallel rank `rank` of `size` holds it
    (`sglang_rank`), with the weights loaded by upstream's own loaders: the ground truth for
    the engine plugin's shard maps, for any tensor-parallel shape. By default as on GPUs
    (KV heads fewer than ranks replicated); with `cpu_padding` as upstream's CPU engine
    holds it (`sglang_cpu_config`, loaded by the padding-aware loaders the engine processes
    select: `cpu_standins.load_padded_shards`). Returns (model, the config it was built with)."""
    import importlib

    architecture = type(hf_model).__name__
    config = sglang_cpu_config(hf_model, size) if cpu_padding else hf_model.config
    with sglang_rank(rank, size), mock.patch("sglang.srt.layers.linear._is_cpu", cpu_padding):
        model_class = getattr(importlib.import_module(SGLANG_MODEL_MODULES[architecture]), architecture)
        model = model_class(config=config)
        model.load_weights(list(hf_model.state_dict().items()))
    return model, config


def run_cli(entry, argv: list) -> tuple:
    """(exit status, stderr) of a CLI entry point run in this process."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            entry(argv)
            status = 0
        except SystemExit as exit_:
            status = exit_.code
    return status, stderr.getvalue()
