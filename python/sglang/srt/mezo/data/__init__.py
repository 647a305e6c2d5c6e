"""The MeZO data path: sources -> tokenization -> `MeZODataset` -> batches.

* `sources`: reading files, saved datasets and in-memory records, and naming the file,
  line and field of bad input (`DataError`);
* `tokenization`: the prompt/completion tokenization rule and chat rendering;
* `dataset`: `MeZODataset`, validated, tokenized, truncated examples;
* `batching`: `MeZOCollator` (padding, candidate rows), `MeZOSampler` and
  `create_dataloader` (sharding across data-parallel ranks).
"""

from sglang.srt.mezo.data.batching import MeZOCollator, MeZOSampler, create_dataloader
from sglang.srt.mezo.data.dataset import MeZODataset
from sglang.srt.mezo.data.sources import DataError, load_source
from sglang.srt.mezo.data.tokenization import encode_example, tokenizer_adds_bos
from sglang.srt.mezo.objectives import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "MeZOCollator",
    "MeZODataset",
    "MeZOSampler",
    "create_dataloader",
    "encode_example",
    "load_source",
    "tokenizer_adds_bos",
]
