"""Writes the demo sentiment task shipped with the CLI (python/sglang/srt/mezo/demo_data/).

Prompt-based, as in the MeZO paper: a question the model can read ("Did the reviewer like
it?") answered by words it already knows (" yes" / " no"). Zero-shot, SmolLM2-135M-Instruct
answers the same way whatever the review (50% accuracy); a few hundred MeZO steps with LoRA
teach it to answer from the review. Sentences are
composed from short phrase lists with a fixed seed, so the files are reproducible:
``python scripts/make_demo_data.py``.
"""

import json
import random
from pathlib import Path

SUBJECTS = [
    "The movie",
    "The film",
    "The acting",
    "The plot",
    "The story",
    "The soundtrack",
    "The ending",
    "The dialogue",
    "The cast",
    "The director's new picture",
    "This sequel",
    "The screenplay",
    "The cinematography",
    "The lead performance",
    "The documentary",
    "The animation",
]
POSITIVE = [
    "was wonderful",
    "was a delight from start to finish",
    "moved me to tears",
    "was brilliant",
    "was funny and warm",
    "is a masterpiece",
    "was beautifully made",
    "kept me smiling",
    "was charming and clever",
    "exceeded every expectation",
    "was a joy to watch",
    "felt fresh and exciting",
    "was superb",
    "left me inspired",
    "was heartfelt and honest",
    "deserves every award",
]
NEGATIVE = [
    "was terrible",
    "was a boring mess",
    "put me to sleep",
    "was awful",
    "was dull and far too long",
    "is a disaster",
    "was poorly made",
    "made me want to leave",
    "was clumsy and stupid",
    "was a huge disappointment",
    "was painful to watch",
    "felt stale and lazy",
    "was dreadful",
    "left me angry",
    "was fake and shallow",
    "deserves to be forgotten",
]
ENDINGS = {
    True: ["", "", " I would watch it again.", " Highly recommended.", " What a night."],
    False: ["", "", " Avoid it.", " Never again.", " What a night."],
}


def review(rng: random.Random, positive: bool) -> str:
    phrase = rng.choice(POSITIVE if positive else NEGATIVE)
    ending = rng.choice(ENDINGS[positive])
    return f"{rng.choice(SUBJECTS)} {phrase}.{ending}"


def records(n: int, seed: int, exclude: set) -> list:
    """n balanced records whose prompts are unique and not in `exclude` (eval never repeats train)."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        positive = len(out) % 2 == 0
        prompt = f"Review: {review(rng, positive)}\nDid the reviewer like it?"
        if prompt in exclude:
            continue
        exclude.add(prompt)
        out.append(
            {
                "prompt": prompt,
                "completion": " yes" if positive else " no",
                "candidates": [" yes", " no"],
            }
        )
    rng.shuffle(out)
    return out


def main() -> None:
    root = Path(__file__).resolve().parents[1] / "python" / "sglang" / "srt" / "mezo" / "demo_data"
    root.mkdir(parents=True, exist_ok=True)
    seen = set()
    for name, n, seed in (("train", 512, 0), ("eval", 200, 1)):
        with (root / f"{name}.jsonl").open("w") as f:
            for r in records(n, seed, seen):
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
