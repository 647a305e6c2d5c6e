"""TestMeZODataset: the MeZO data path (sources, tokenization, batching, sampling, errors).

Self-contained: tiny byte-level BPE tokenizer from `mezo_testing`, small files in a temp dir.
Expected token ids below come from that tokenizer (a BPE trained on `mezo_testing.CORPUS`):
    "Answer:" -> [282, 314, 28]    "Answer: " -> [282, 314, 28, 223]    " yes" -> [304, 85]
    "yes" -> [296, 85]             " no" -> [279, 81]                    "Answer: yes" -> [282, 314, 28, 304, 85]
"""

import csv
import json
import os
import shutil
import tempfile
import unittest

import datasets
import torch
from mezo_testing import tiny_llama, tiny_tokenizer
from tokenizers import processors

from sglang.srt.mezo.data import (
    DataError,
    MeZOCollator,
    MeZODataset,
    create_dataloader,
    tokenizer_adds_bos,
)
from sglang.srt.mezo.objectives import candidate_scores, positions, row_logprobs

M = -100  # masked label

PLAIN = [
    {"prompt": "Answer:", "completion": " yes"},
    {"prompt": "Review: dull.", "completion": " Sentiment: negative"},
    {"prompt": "", "completion": "red green blue"},
]
CANDIDATES = [
    {"prompt": "Question: is the sky blue? Answer:", "completion": " yes", "candidates": [" yes", " no"]},
    {"prompt": "Review: dull. Sentiment:", "completion": " negative", "candidates": [" positive", " negative"]},
    {"prompt": "Answer:", "completion": " no", "candidates": [" yes", " no", " blue"]},
]


def _write_jsonl(path, records, blank_after=None):
    with open(path, "w") as f:
        for i, r in enumerate(records):
            f.write(json.dumps(r) + "\n")
            if blank_after is not None and i == blank_after:
                f.write("\n")
    return path


def _write_text(path, text, mode="w"):
    with open(path, mode) as f:
        f.write(text)
    return path


def _write_csv(path, records):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        for r in records:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    return path


def _all_formats(directory, records):
    """The same records as every supported source: name -> (source, extra kwargs)."""
    table = datasets.Dataset.from_list(records)
    with open(os.path.join(directory, "array.json"), "w") as f:
        json.dump(records, f, indent=1)  # multi-line JSON array
    with open(os.path.join(directory, "object.json"), "w") as f:
        json.dump({"data": records}, f)
    table.to_parquet(os.path.join(directory, "data.parquet"))
    table.save_to_disk(os.path.join(directory, "saved"))
    splits = datasets.DatasetDict({"train": table, "validation": table.select([0])})
    splits.save_to_disk(os.path.join(directory, "saved_dict"))
    return {
        "jsonl": (_write_jsonl(os.path.join(directory, "data.jsonl"), records), {}),
        "json-array": (os.path.join(directory, "array.json"), {}),
        "json-data": (os.path.join(directory, "object.json"), {}),
        "csv": (_write_csv(os.path.join(directory, "data.csv"), records), {}),
        "parquet": (os.path.join(directory, "data.parquet"), {}),
        "saved-dir": (os.path.join(directory, "saved"), {}),
        "saved-dict-dir": (os.path.join(directory, "saved_dict"), {"split": "train"}),
        "Dataset": (table, {}),
        "DatasetDict": (splits, {"split": "train"}),
        "list": (list(records), {}),
    }


def _bos_tokenizer():
    """The tiny tokenizer with a post-processor that prepends <s> (id 1), like Llama's."""
    tok = tiny_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def _examples(dataset):
    return [dataset[i] for i in range(len(dataset))]


class TestMeZODataset(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        datasets.disable_progress_bars()
        cls.tok = tiny_tokenizer()

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="mezo_data_")
        self.cache = tempfile.mkdtemp(prefix="mezo_cache_")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.addCleanup(shutil.rmtree, self.cache, True)

    def path(self, name):
        return os.path.join(self.dir, name)

    def load(self, source, **kwargs):
        return MeZODataset(source, self.tok, cache_dir=self.cache, **kwargs)

    def assertDataError(self, source, *fragments, **kwargs):
        with self.assertRaises(DataError) as ctx:
            self.load(source, **kwargs)
        message = str(ctx.exception)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    # ---------------------------------------------------------------- sources and formats
    def test_every_format_gives_identical_examples(self):
        for records in (PLAIN, CANDIDATES):
            sub = tempfile.mkdtemp(dir=self.dir)
            reference = _examples(self.load(list(records)))
            self.assertEqual(len(reference), 3)
            for name, (source, kwargs) in _all_formats(sub, records).items():
                with self.subTest(format=name, candidates="candidates" in records[0]):
                    dataset = self.load(source, **kwargs)
                    self.assertEqual(len(dataset), 3)
                    self.assertEqual(dataset.skipped, 0)
                    self.assertEqual(_examples(dataset), reference)
        plain = _examples(self.load(PLAIN))
        self.assertEqual(
            plain[0], {"example_id": 0, "rows": [([282, 314, 28, 304, 85], [M, M, M, 304, 85])], "gold": None, "prompt_length": 3}
        )
        # An empty prompt: every token is a completion token (the first one has no context).
        self.assertEqual(plain[2]["prompt_length"], 0)
        self.assertEqual(plain[2]["rows"][0][0], self.tok("red green blue").input_ids)
        self.assertEqual(plain[2]["rows"][0][1], self.tok("red green blue").input_ids)
        candidates = _examples(self.load(CANDIDATES))
        self.assertEqual(
            candidates[2],
            {
                "example_id": 2,
                "rows": [
                    ([282, 314, 28, 304, 85], [M, M, M, 304, 85]),
                    ([282, 314, 28, 279, 81], [M, M, M, 279, 81]),
                    ([282, 314, 28, 311], [M, M, M, 311]),
                ],
                "gold": 1,
                "prompt_length": 3,
            },
        )

    def test_datasetdict_needs_a_split(self):
        splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(PLAIN)})
        self.assertDataError(splits, "split=", "'train'")
        self.assertDataError(splits, "no split 'test'", split="test")
        self.assertDataError(_all_formats(self.dir, PLAIN)["saved-dict-dir"][0], "saved_dict", "split=")

    def test_custom_field_names(self):
        records = [{"q": "Answer:", "a": " no", "options": [" yes", " no"]}]
        dataset = self.load(records, prompt_field="q", completion_field="a", candidates_field="options")
        self.assertEqual(dataset[0]["gold"], 1)
        self.assertEqual(dataset[0]["rows"][1], ([282, 314, 28, 279, 81], [M, M, M, 279, 81]))

    # ---------------------------------------------------------------- tokenization
    def test_tokenization_rule_on_bpe(self):
        # Joined text tokenizes as prompt tokens + rest: the row IS the joined tokenization.
        row = self.load([{"prompt": "Answer:", "completion": " yes"}])[0]["rows"][0]
        self.assertEqual(row, ([282, 314, 28, 304, 85], [M, M, M, 304, 85]))
        self.assertEqual(row[0], self.tok("Answer: yes").input_ids)
        # A prompt ending in a space: BPE joins the space to "yes" (" yes" = 304), so the joined
        # ids [282, 314, 28, 304, 85] do not start with the prompt's [282, 314, 28, 223]: fall back
        # to prompt ids + ids of "yes" alone ([296, 85]), keeping the prompt's tokens intact.
        row = self.load([{"prompt": "Answer: ", "completion": "yes"}])[0]["rows"][0]
        self.assertEqual(row, ([282, 314, 28, 223, 296, 85], [M, M, M, M, 296, 85]))
        # Candidates are decided one by one, all rows share the prompt tokens.
        example = self.load([{"prompt": "Answer: ", "completion": "yes", "candidates": ["yes", " no"]}])[0]
        self.assertEqual(example["rows"][0][0], [282, 314, 28, 223, 296, 85])
        # "Answer:  no" (two spaces) tokenizes as the prompt's [.., 223] + " no": the joined rule applies.
        self.assertEqual(example["rows"][1], ([282, 314, 28, 223, 279, 81], [M, M, M, M, 279, 81]))
        self.assertEqual(example["prompt_length"], 4)

    def test_bos_and_eos(self):
        self.assertFalse(tokenizer_adds_bos(self.tok))
        bos_tok = _bos_tokenizer()
        self.assertEqual(bos_tok("x").input_ids, [1, 90])
        self.assertTrue(tokenizer_adds_bos(bos_tok))
        # Auto: BOS because the tokenizer adds it; exactly one, masked as prompt.
        dataset = MeZODataset([{"prompt": "Answer:", "completion": " yes"}], bos_tok)
        self.assertEqual(dataset[0]["rows"][0], ([1, 282, 314, 28, 304, 85], [M, M, M, M, 304, 85]))
        self.assertEqual(dataset[0]["prompt_length"], 4)
        # Forced on / off.
        row = self.load([{"prompt": "Answer:", "completion": " yes"}], add_bos=True)[0]["rows"][0]
        self.assertEqual(row[0], [1, 282, 314, 28, 304, 85])
        row = MeZODataset([{"prompt": "Answer:", "completion": " yes"}], bos_tok, add_bos=False)[0]["rows"][0]
        self.assertEqual(row[0], [282, 314, 28, 304, 85])
        # EOS (id 2) appended to every candidate and trained on.
        example = self.load([{"prompt": "Answer:", "completion": " no", "candidates": [" yes", " no"]}], add_eos=True)[0]
        self.assertEqual(example["rows"][0], ([282, 314, 28, 304, 85, 2], [M, M, M, 304, 85, 2]))
        self.assertEqual(example["rows"][1], ([282, 314, 28, 279, 81, 2], [M, M, M, 279, 81, 2]))

    def test_truncation_keeps_completion_and_cuts_prompt_left(self):
        record = {"prompt": "Question: is the sky blue? Answer:", "completion": " yes"}
        prompt = [318, 28, 309, 362, 375, 311, 33, 316, 28]
        full = self.load([record])[0]["rows"][0]
        self.assertEqual(full[0], prompt + [304, 85])
        row = self.load([record], max_length=5)[0]["rows"][0]
        self.assertEqual(row, (prompt[-3:] + [304, 85], [M, M, M, 304, 85]))
        # With BOS the BOS stays first and the prompt loses one more token on the left.
        row = self.load([record], max_length=5, add_bos=True)[0]["rows"][0]
        self.assertEqual(row, ([1] + prompt[-2:] + [304, 85], [M, M, M, 304, 85]))
        # Candidates: the prompt is cut for the longest candidate; rows stay within max_length.
        example = self.load([dict(record, candidates=[" yes", " blue"])], max_length=5)[0]
        self.assertEqual(example["rows"][1], (prompt[-3:] + [311], [M, M, M, 311]))
        self.assertEqual(example["prompt_length"], 3)
        # A completion that fills max_length exactly leaves no prompt.
        self.assertEqual(self.load([record], max_length=2)[0]["rows"][0], ([304, 85], [304, 85]))

    def test_overlong_completion_errors_or_is_skipped(self):
        records = [
            {"prompt": "Answer:", "completion": " yes"},
            {"prompt": "Answer:", "completion": " Sentiment: negative"},  # 5 tokens
            {"prompt": "Answer:", "completion": " no"},
        ]
        path = _write_jsonl(self.path("long.jsonl"), records)
        self.assertDataError(
            path, "long.jsonl: line 2:", "'completion'", "5 tokens", "max_length=4", "overlong='skip'", max_length=4
        )
        dataset = self.load(path, max_length=4, overlong="skip")
        self.assertEqual((len(dataset), dataset.skipped), (2, 1))
        self.assertEqual([ex["example_id"] for ex in dataset], [0, 2])  # ids name the source records
        self.assertEqual(dataset[1]["rows"][0][0], [282, 314, 28, 279, 81][-4:])
        self.assertDataError([records[1]], "all 1 examples", max_length=4, overlong="skip")
        with self.assertRaises(ValueError):
            self.load(path, overlong="truncate")

    def test_chat_template_loss_on_last_assistant_turn(self):
        messages = [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "is the sky blue?"},
            {"role": "assistant", "content": "yes"},
            {"role": "user", "content": "is fire cold?"},
            {"role": "assistant", "content": "no"},
        ]
        path = _write_jsonl(self.path("chat.jsonl"), [{"messages": messages}])
        example = self.load(path)[0]
        self.assertEqual(example, self.load([{"messages": messages}])[0])
        full = self.tok.apply_chat_template(messages, tokenize=False)
        prompt = self.tok.apply_chat_template(messages[:4], tokenize=False, add_generation_prompt=True)
        self.assertEqual(full, prompt + "no</s>")
        self.assertTrue(prompt.endswith("</s><|assistant|>"))
        input_ids, labels = example["rows"][0]
        self.assertEqual(input_ids, self.tok(full).input_ids)
        n_prompt = len(self.tok(prompt).input_ids)
        self.assertEqual(example["prompt_length"], n_prompt)
        completion = self.tok("no</s>", add_special_tokens=False).input_ids
        self.assertEqual(completion[-1], 2)  # the template's EOS is trained on
        self.assertEqual(labels, [M] * n_prompt + completion)
        # The first assistant turn ("yes") is context only.
        self.assertEqual(sum(label != M for label in labels), len(completion))
        # Turns after the last assistant message are dropped.
        trailing = self.load([{"messages": messages + [{"role": "user", "content": "ok"}]}])[0]
        self.assertEqual(trailing, example)

    # ---------------------------------------------------------------- batching
    def test_collator_padding_and_masks(self):
        examples = [self.load(PLAIN)[i] for i in (0, 1)]
        long_ids = self.tok("Review: dull. Sentiment: negative").input_ids
        self.assertEqual(len(long_ids), 10)
        self.assertEqual(examples[1]["rows"][0][0], long_ids)
        self.assertEqual(examples[1]["prompt_length"], 5)
        right = MeZOCollator(pad_token_id=0, pad_side="right")(examples)
        self.assertEqual(sorted(right), ["attention_mask", "input_ids", "labels"])
        self.assertEqual(right["input_ids"].tolist(), [[282, 314, 28, 304, 85] + [0] * 5, long_ids])
        self.assertEqual(right["attention_mask"].tolist(), [[1] * 5 + [0] * 5, [1] * 10])
        self.assertEqual(right["labels"].tolist(), [[M, M, M, 304, 85] + [M] * 5, [M] * 5 + long_ids[5:]])
        left = MeZOCollator(pad_token_id=0, pad_side="left")(examples)
        self.assertEqual(left["input_ids"].tolist(), [[0] * 5 + [282, 314, 28, 304, 85], long_ids])
        self.assertEqual(left["attention_mask"].tolist(), [[0] * 5 + [1] * 5, [1] * 10])
        self.assertEqual(left["labels"].tolist(), [[M] * 5 + [M, M, M, 304, 85], [M] * 5 + long_ids[5:]])
        for batch in (right, left):
            self.assertEqual(batch["input_ids"].dtype, torch.long)
            self.assertEqual(batch["labels"].dtype, torch.long)
            self.assertEqual(batch["attention_mask"].dtype, torch.long)
        # Same positions for the real tokens either way, hence the same completion log-likelihood.
        self.assertEqual(positions(left)[0, 5:].tolist(), [0, 1, 2, 3, 4])
        self.assertEqual(positions(right)[0, :5].tolist(), [0, 1, 2, 3, 4])
        model = tiny_llama()
        sums_r, counts_r = row_logprobs(model, right)
        sums_l, counts_l = row_logprobs(model, left)
        self.assertEqual(counts_r.tolist(), [2, 5])
        self.assertEqual(counts_l.tolist(), [2, 5])
        torch.testing.assert_close(sums_l, sums_r, rtol=1e-5, atol=1e-5)
        # Padding to a multiple.
        padded = MeZOCollator(pad_token_id=0, pad_to_multiple_of=8)(examples)
        self.assertEqual(tuple(padded["input_ids"].shape), (2, 16))
        with self.assertRaises(ValueError):
            MeZOCollator(pad_token_id=0, pad_side="middle")

    def test_candidate_expansion(self):
        dataset = self.load(CANDIDATES)
        batch = MeZOCollator(pad_token_id=0)([dataset[2], dataset[0]])
        self.assertEqual(batch["example_id"].tolist(), [2, 2, 2, 0, 0])
        self.assertEqual(batch["candidate_id"].tolist(), [0, 1, 2, 0, 1])
        self.assertEqual(batch["is_gold"].tolist(), [False, True, False, True, False])
        self.assertEqual(batch["is_gold"].dtype, torch.bool)
        self.assertEqual(batch["prompt_length"].tolist(), [3, 3, 3, 9, 9])
        self.assertEqual(tuple(batch["input_ids"].shape), (5, 11))
        # Rows of an example share the prompt tokens; labels only on the candidate's tokens.
        self.assertTrue(all(batch["input_ids"][r, :3].tolist() == [282, 314, 28] for r in range(3)))
        self.assertEqual(batch["labels"][2].tolist(), [M, M, M, 311] + [M] * 7)
        self.assertEqual(batch["attention_mask"][2].tolist(), [1] * 4 + [0] * 7)
        groups = candidate_scores(torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.long), batch)
        self.assertEqual([(len(s), g) for s, g in groups], [(3, 1), (2, 0)])
        # Candidate and plain examples do not mix.
        with self.assertRaises(ValueError) as ctx:
            MeZOCollator(0)([dataset[0], self.load(PLAIN)[0]])
        self.assertIn("mixes candidate and plain", str(ctx.exception))
        path = _write_jsonl(self.path("mixed.jsonl"), [CANDIDATES[0], PLAIN[0]])
        self.assertDataError(path, "mixed.jsonl: line 2:", "'candidates' is missing", "line 1")

    # ---------------------------------------------------------------- bad input
    def test_bad_json_names_file_and_line(self):
        path = _write_text(self.path("bad.jsonl"), json.dumps(PLAIN[0]) + "\n\n" + '{"prompt": "x", "completion": }\n')
        self.assertDataError(path, "bad.jsonl: line 3:", "invalid JSON")
        array = json.dumps(PLAIN, indent=1).replace('"Review: dull."', "'Review: dull.'")
        line = next(i for i, text in enumerate(array.splitlines(), 1) if "Review" in text)
        self.assertDataError(_write_text(self.path("bad.json"), array), f"bad.json: line {line}:", "invalid JSON")
        self.assertDataError(_write_text(self.path("list.jsonl"), json.dumps(PLAIN[0]) + "\n[1, 2]\n"), "line 2", "JSON object")
        invalid_utf8 = json.dumps(PLAIN[0]).encode() + b'\n{"prompt": "\xff", "completion": " yes"}\n'
        self.assertDataError(_write_text(self.path("bytes.jsonl"), invalid_utf8, "wb"), "bytes.jsonl: line 2:", "UTF-8")

    def test_missing_and_non_string_fields(self):
        records = [PLAIN[0], PLAIN[1], {"prompt": "Answer:"}]
        path = _write_jsonl(self.path("missing.jsonl"), records, blank_after=0)  # a blank line 2
        self.assertDataError(path, "missing.jsonl: line 4:", "missing field 'completion'", "fields present: ['prompt']")
        self.assertDataError(records, "<list of records>: row 2:", "missing field 'completion'")
        path = _write_jsonl(self.path("int.jsonl"), [PLAIN[0], {"prompt": 7, "completion": " yes"}])
        self.assertDataError(path, "int.jsonl: line 2:", "field 'prompt' must be a string", "int")
        path = _write_jsonl(self.path("ints.jsonl"), [{"prompt": "Answer:", "completion": 1}])
        self.assertDataError(path, "ints.jsonl: line 1:", "field 'completion' must be a string")
        path = _write_jsonl(self.path("empty_completion.jsonl"), [{"prompt": "Answer:", "completion": ""}])
        self.assertDataError(path, "line 1", "field 'completion' is empty")
        path = _write_jsonl(self.path("noprompt.jsonl"), [{"text": "a"}])
        self.assertDataError(path, "noprompt.jsonl: line 1:", "missing field 'prompt'", "fields present: ['text']")
        self.assertDataError(["not a dict"], "row 0", "expected a dict")
        messages = [{"messages": [{"role": "user", "content": "hi"}]}]
        self.assertDataError(messages, "row 0", "field 'messages'", "no assistant message")
        self.assertDataError([{"messages": [{"role": "user", "content": 3}]}], "row 0", "field 'messages'", "'content'")

    def test_bad_candidates(self):
        bad = dict(CANDIDATES[0], completion=" maybe")
        path = _write_jsonl(self.path("cands.jsonl"), [CANDIDATES[1], bad])
        self.assertDataError(path, "cands.jsonl: line 2:", "field 'completion'", "' maybe' is not one of the candidates")
        path = _write_jsonl(self.path("cand_type.jsonl"), [dict(CANDIDATES[0], candidates=[" yes", 3])])
        self.assertDataError(path, "cand_type.jsonl: line 1:", "field 'candidates'", "candidate 1")
        self.assertDataError([dict(CANDIDATES[0], candidates=[" yes", " yes"])], "row 0", "duplicate candidates")
        self.assertDataError([dict(CANDIDATES[0], candidates=[])], "row 0", "non-empty list")
        # CSV: row 1 spans lines 2-3 (a quoted newline), so row 2 starts on line 4.
        with open(self.path("bad.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["prompt", "completion", "candidates"])
            writer.writerow(["Answer\n:", " yes", json.dumps([" yes", " no"])])
            writer.writerow(["Answer:", " no", "[' yes', ' no']"])
        self.assertDataError(self.path("bad.csv"), "bad.csv: line 4:", "field 'candidates' is not valid JSON")

    def test_empty_unreadable_and_unknown_sources(self):
        self.assertDataError(_write_text(self.path("empty.jsonl"), ""), "empty.jsonl", "empty")
        self.assertDataError(_write_text(self.path("blank.jsonl"), "\n\n"), "blank.jsonl", "empty")
        self.assertDataError(_write_text(self.path("header.csv"), "prompt,completion\n"), "header.csv", "empty")
        self.assertDataError([], "<list of records>", "empty dataset")
        self.assertDataError(_write_text(self.path("empty.json"), "[]"), "empty.json", "empty dataset")
        self.assertDataError(_write_text(self.path("empty_data.json"), '{"data": []}'), "empty_data.json", "empty")
        self.assertDataError(self.path("nope.jsonl"), "nope.jsonl", "no such file")
        self.assertDataError(_write_text(self.path("data.txt"), "x"), "data.txt", "unknown extension '.txt'")
        self.assertDataError(_write_text(self.path("junk.parquet"), "not parquet"), "junk.parquet", "PARQUET")
        os.makedirs(self.path("folder"))
        self.assertDataError(self.path("folder"), "folder", "save_to_disk")
        with self.assertRaises(TypeError):
            self.load(42)
        # Nothing is written next to the inputs by a failed load.
        before = sorted(os.listdir(self.dir))
        self.assertDataError(_write_jsonl(self.path("bad2.jsonl"), [{"prompt": 1}]), "bad2.jsonl")
        self.assertEqual(sorted(os.listdir(self.dir)), sorted(before + ["bad2.jsonl"]))

    # ---------------------------------------------------------------- sampling
    def _shards(self, dataset, world_size, **kwargs):
        shards = []
        for rank in range(world_size):
            loader = create_dataloader(dataset, 2, distributed=True, rank=rank, world_size=world_size, **kwargs)
            shards.append(list(loader.sampler))
        return shards

    def test_sampler_shards_for_world_sizes_1_to_4(self):
        records = [{"prompt": "Answer:", "completion": " yes" if i % 2 else " no"} for i in range(12)]
        dataset = self.load(records)
        for world_size in (1, 2, 3, 4):
            for shuffle in (True, False):
                with self.subTest(world_size=world_size, shuffle=shuffle):
                    shards = self._shards(dataset, world_size, shuffle=shuffle, seed=5)
                    self.assertEqual([len(s) for s in shards], [12 // world_size] * world_size)
                    flat = [i for s in shards for i in s]
                    self.assertEqual(sorted(flat), list(range(12)))  # disjoint and complete
                    if not shuffle:
                        self.assertEqual(shards[0], list(range(0, 12, world_size)))
        # 10 examples do not divide by 3 or 4: pad with repeats (default) or drop (drop_last=True).
        dataset = self.load(records[:10])
        for world_size in (3, 4):
            with self.subTest(world_size=world_size, policy="pad"):
                shards = self._shards(dataset, world_size, seed=5)
                per_rank = -(-10 // world_size)
                self.assertEqual([len(s) for s in shards], [per_rank] * world_size)
                flat = [i for s in shards for i in s]
                self.assertEqual(set(flat), set(range(10)))  # complete
                self.assertEqual(len(flat) - len(set(flat)), per_rank * world_size - 10)  # repeats
                self.assertTrue(all(len(set(s)) == len(s) for s in shards))  # never twice on one rank
            with self.subTest(world_size=world_size, policy="drop"):
                shards = self._shards(dataset, world_size, seed=5, drop_last=True)
                self.assertEqual([len(s) for s in shards], [10 // world_size] * world_size)
                flat = [i for s in shards for i in s]
                self.assertEqual(len(set(flat)), len(flat))  # disjoint
                self.assertEqual(len(flat), 10 - 10 % world_size)

    def test_candidate_groups_stay_whole_across_batches_and_ranks(self):
        records = [dict(CANDIDATES[i % 3]) for i in range(8)]
        dataset = self.load(records)
        n_candidates = [len(dataset[i]["rows"]) for i in range(8)]
        seen = []
        for rank in range(2):
            loader = create_dataloader(dataset, 3, distributed=True, rank=rank, world_size=2, seed=1)
            batches = list(loader)
            self.assertEqual([len(torch.unique(b["example_id"])) for b in batches], [3, 1])  # 4 examples per rank
            for batch in batches:
                ids = batch["example_id"].tolist()
                runs = [ids[0]] + [b for a, b in zip(ids, ids[1:]) if a != b]
                self.assertEqual(len(runs), len(set(runs)))  # each example's rows are adjacent
                for example in runs:
                    rows = batch["candidate_id"][batch["example_id"] == example].tolist()
                    self.assertEqual(rows, list(range(n_candidates[example])))  # all of them
                    self.assertEqual(int(batch["is_gold"][batch["example_id"] == example].sum()), 1)
                seen.extend(runs)
        self.assertEqual(sorted(seen), list(range(8)))

    def test_epochs_are_deterministic_and_seeded(self):
        dataset = self.load([{"prompt": "Answer:", "completion": " yes"} for _ in range(16)])

        def order(seed, epoch, **kwargs):
            loader = create_dataloader(dataset, 4, seed=seed, **kwargs)
            loader.sampler.set_epoch(epoch)
            self.assertEqual(sum(len(batch["input_ids"]) for batch in loader), 16)
            return list(loader.sampler)

        first = order(7, 0)
        self.assertEqual(sorted(first), list(range(16)))
        self.assertEqual(order(7, 0), first)  # same seed and epoch: same order
        self.assertNotEqual(order(7, 1), first)  # set_epoch reshuffles
        self.assertEqual(order(7, 1), order(7, 1))
        self.assertNotEqual(order(8, 0), first)  # the seed matters
        self.assertEqual(order(7, 3, shuffle=False), list(range(16)))
        loader = create_dataloader(dataset, 4, seed=7)
        loader.sampler.set_epoch(2)
        self.assertEqual(list(loader.sampler), list(loader.sampler))  # re-iterating an epoch repeats it

    def test_group_by_length(self):
        records = [{"prompt": "Answer:" * (1 + i % 5), "completion": " yes"} for i in range(20)]
        dataset = self.load(records)
        self.assertEqual(len(dataset.lengths), 20)
        for rank in range(2):
            loader = create_dataloader(dataset, 5, group_by_length=True, distributed=True, rank=rank, world_size=2)
            lengths = [int(dataset.lengths[i]) for i in loader.sampler]
            self.assertEqual(lengths, sorted(lengths, reverse=True))  # one mega-batch: longest first
            batches = list(loader)
            self.assertEqual([len(b["input_ids"]) for b in batches], [5, 5])
            self.assertEqual(batches[0]["attention_mask"].sum(1).tolist(), lengths[:5])
        loader = create_dataloader(dataset, 5, group_by_length=True, seed=1)
        loader.sampler.set_epoch(1)
        self.assertEqual(sorted(loader.sampler), list(range(20)))

    def test_dataloader_arguments(self):
        dataset = self.load(PLAIN)
        batches = list(create_dataloader(dataset, 2, shuffle=False))
        self.assertEqual([len(b["input_ids"]) for b in batches], [2, 1])  # the short last batch is kept
        self.assertEqual(batches[1]["input_ids"].tolist(), [self.tok("red green blue").input_ids])
        left = next(iter(create_dataloader(dataset, 2, shuffle=False, pad_side="left")))
        self.assertEqual(left["attention_mask"][0].tolist(), [0] * 5 + [1] * 5)
        with self.assertRaises(ValueError):
            create_dataloader(dataset, 0)
        with self.assertRaises(ValueError):
            create_dataloader(dataset, 2, distributed=True)  # no process group and no rank/world_size
        with self.assertRaises(ValueError):
            create_dataloader(dataset, 2, distributed=True, rank=2, world_size=2)


if __name__ == "__main__":
    unittest.main()
