"""The checkpoint an SGLang engine serves and the trained model written from it
(`backends/engine_checkpoint.py`), without an engine: a safetensors dir is served as it is,
anything else is converted once into a shared cache, and the exported model equals what
`save_pretrained` writes from a host copy holding the same weights (the pre-cache export,
the independent reference here)."""

import json
import os
import shutil
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import torch
from mezo_testing import tiny_llama, tiny_tokenizer
from safetensors.torch import load_file

from sglang.srt.mezo.backends import engine_checkpoint as checkpoints
from sglang.srt.mezo.backends.engine_checkpoint import engine_checkpoint, write_trained_model


def saved_tensors(directory: Path) -> dict:
    out = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


class TestEngineCheckpoint(unittest.TestCase):
    def setUp(self):
        self.root = Path(tempfile.mkdtemp(prefix="mezo-engine-ckpt-"))
        self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)
        self.cache = self.root / "cache"

    def tiny_dir(self, **save_options) -> Path:
        path = self.root / "tiny"
        tiny_llama().save_pretrained(path, **save_options)
        tiny_tokenizer().save_pretrained(path)
        return path

    def test_a_safetensors_dir_is_served_as_it_is(self):
        path = self.tiny_dir()
        with mock.patch.object(checkpoints, "load_model_and_tokenizer") as loader:
            self.assertEqual(engine_checkpoint(str(path), "float32", str(self.cache)), str(path))
        loader.assert_not_called()
        self.assertFalse(self.cache.exists())  # nothing copied

    def test_a_hub_id_is_served_from_the_hub_cache(self):
        snapshot = self.tiny_dir()  # stands in for the Hub cache's snapshot of the id
        with mock.patch("huggingface_hub.snapshot_download", return_value=str(snapshot)) as download:
            with mock.patch.object(checkpoints, "load_model_and_tokenizer") as loader:
                self.assertEqual(engine_checkpoint("org/tiny", "float32", str(self.cache)), str(snapshot))
        self.assertEqual(download.call_args.args, ("org/tiny",))
        loader.assert_not_called()

    def test_the_gguf_default_is_converted_once_per_dtype(self):
        """The GGUF loader (heavy: 135M weights) is mocked; the conversion is real."""
        calls = []

        def load(model, dtype):
            calls.append((model, dtype))
            return tiny_llama(dtype=getattr(torch, dtype)), tiny_tokenizer()

        with mock.patch.object(checkpoints, "load_model_and_tokenizer", side_effect=load):
            first = engine_checkpoint("smollm2-135m", "float32", str(self.cache))
            again = engine_checkpoint("smollm2-135m", "float32", str(self.cache))
            half = engine_checkpoint("smollm2-135m", "bfloat16", str(self.cache))
        self.assertEqual(calls, [("smollm2-135m", "float32"), ("smollm2-135m", "bfloat16")])
        self.assertEqual(first, again)
        self.assertNotEqual(first, half)
        self.assertEqual(sorted(p.name for p in self.cache.iterdir()), sorted([Path(first).name, Path(half).name]))
        reference = tiny_llama().state_dict()
        for name, value in saved_tensors(Path(first)).items():
            self.assertTrue(torch.equal(value, reference[name]), name)
        self.assertTrue((Path(first) / "tokenizer.json").is_file())
        self.assertEqual({v.dtype for v in saved_tensors(Path(half)).values()}, {torch.bfloat16})

    def test_a_failed_conversion_leaves_no_entry(self):
        """A conversion that dies half-way leaves nothing a later run would serve."""

        def broken_save(self_model, directory, **kwargs):
            (Path(directory) / "config.json").write_text("{}")  # half of a checkpoint
            raise OSError("disk full")

        with mock.patch.object(checkpoints, "load_model_and_tokenizer", return_value=(tiny_llama(), tiny_tokenizer())):
            with mock.patch("transformers.PreTrainedModel.save_pretrained", broken_save):
                with self.assertRaisesRegex(OSError, "disk full"):
                    engine_checkpoint("smollm2-135m", "float32", str(self.cache))
        self.assertEqual(list(self.cache.iterdir()), [])

    def test_the_cache_defaults_under_xdg_cache_home(self):
        with mock.patch.dict(os.environ, {"XDG_CACHE_HOME": str(self.root / "xdg")}):
            self.assertEqual(checkpoints.default_cache_dir(), self.root / "xdg" / "sglang-mezo" / "engine-checkpoints")

    def host_copy_export(self, source: Path, trained: dict, dtype, directory: Path) -> None:
        """The reference: the export before this module, through a host copy of the model."""
        from transformers import AutoModelForCausalLM

        host = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        self.assertEqual(host.load_state_dict(trained, strict=False).unexpected_keys, [])
        host.save_pretrained(directory)

    def check_export(self, source: Path, dtype: torch.dtype) -> None:
        start = load_file(str(next(source.glob("*.safetensors"))))
        names = sorted(saved_tensors(source))
        generator = torch.Generator().manual_seed(0)
        trained = {n: torch.randn(saved_tensors(source)[n].shape, generator=generator).to(dtype) for n in names[::3]}
        exported = write_trained_model(str(source), trained, str(dtype).split(".")[1], self.root / "new")
        self.host_copy_export(source, trained, dtype, self.root / "old")
        new, old = saved_tensors(exported), saved_tensors(self.root / "old")
        self.assertEqual(sorted(new), sorted(old))
        for name in new:
            self.assertEqual(new[name].dtype, old[name].dtype, name)
            self.assertTrue(torch.equal(new[name], old[name]), name)
        self.assertTrue(any(not torch.equal(new[n], start[n].to(dtype)) for n in trained if n in start))
        for config in ("config.json", "generation_config.json"):
            self.assertEqual(
                json.loads((exported / config).read_text()), json.loads((self.root / "old" / config).read_text())
            )

    def test_the_exported_model_is_what_a_host_copy_would_save(self):
        self.check_export(self.tiny_dir(), torch.float32)

    def test_the_export_follows_the_runs_dtype_and_the_sources_shards(self):
        source = self.tiny_dir(max_shard_size="20KB")
        self.assertGreater(len(list(source.glob("*.safetensors"))), 1)
        self.check_export(source, torch.bfloat16)
        index = json.loads((self.root / "new" / checkpoints.INDEX_FILE).read_text())
        self.assertEqual(set(index["weight_map"].values()), {p.name for p in (self.root / "new").glob("*.safetensors")})

    def test_a_trained_tensor_the_checkpoint_lacks_is_refused(self):
        source = self.tiny_dir()
        with self.assertRaisesRegex(RuntimeError, "does not hold: \\['not.a.weight'\\]"):
            write_trained_model(str(source), {"not.a.weight": torch.zeros(2)}, "float32", self.root / "new")


if __name__ == "__main__":
    unittest.main(verbosity=2)
