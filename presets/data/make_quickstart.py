"""Regenerate the quickstart dataset: `python presets/data/make_quickstart.py` (stdlib only, seeded).

Short product reviews built from templates, with exactly balanced labels in every split and no
review text repeated across splits. Negation ("not great") flips the polarity of the quality word,
so a linear bag of words cannot separate the classes, and 8% of the reviews carry the opposite
label's text, so a perfect score is not possible: the majority baseline is 50%, a bag-of-bigrams
logistic regression about 80%, a finetuned MiniLM around 90%.
"""

import json
import os
import random
from pathlib import Path

PRODUCTS = ["phone", "laptop", "blender", "backpack", "headset", "kettle", "monitor", "camera", "chair", "lamp",
            "keyboard", "toaster", "jacket", "speaker", "tent", "watch", "printer", "mattress", "drill", "router"]
POSITIVE = ["great", "excellent", "reliable", "sturdy", "comfortable", "fantastic", "well made", "worth the money",
            "easy to use", "quiet", "fast", "beautiful"]
NEGATIVE = ["terrible", "flimsy", "disappointing", "noisy", "slow", "overpriced", "broken", "uncomfortable",
            "cheaply made", "useless", "awful", "hard to use"]
TEMPLATES = ["The {product} is {quality}.", "This {product} was {quality}.", "I found the {product} {quality}.",
             "Honestly, the {product} is {quality}.", "My new {product} is {quality} so far.",
             "After a month, the {product} feels {quality}.", "The {product} turned out {quality}.",
             "Overall the {product} is {quality}, as expected."]
NEGATED = ["The {product} is not {quality}.", "This {product} was not {quality} at all.",
           "I would not call the {product} {quality}.", "The {product} is far from {quality}."]
FILLERS = ["", " Delivery took a week.", " I bought it for my office.", " The box was green.", " My sister has one too."]
NEGATION_SHARE = 0.3
NOISE = 0.08
SIZES = {"train": 800, "validation": 200, "test": 200}
SEED = 20240301


def review_text(rng: random.Random, positive: bool) -> str:
    negated = rng.random() < NEGATION_SHARE
    quality = rng.choice(NEGATIVE if positive == negated else POSITIVE)
    template = rng.choice(NEGATED if negated else TEMPLATES)
    return template.format(product=rng.choice(PRODUCTS), quality=quality) + rng.choice(FILLERS)


def split_rows(rng: random.Random, size: int, seen: set[str]) -> list[dict]:
    """``size`` reviews, half of each label, none of whose texts is in ``seen`` (which grows)."""
    labels = [index % 2 == 0 for index in range(size)]
    rng.shuffle(labels)
    rows = []
    for positive in labels:
        noisy = rng.random() < NOISE
        text = review_text(rng, positive != noisy)
        while text in seen:
            text = review_text(rng, positive != noisy)
        seen.add(text)
        rows.append({"text": text, "label": "positive" if positive else "negative"})
    return rows


def write_atomically(path: Path, text: str) -> None:
    temp = path.with_name(f".tmp-{path.name}")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


def main() -> None:
    rng = random.Random(SEED)
    out = Path(__file__).resolve().parent / "quickstart"
    out.mkdir(exist_ok=True)
    seen: set[str] = set()
    for split, size in SIZES.items():
        rows = split_rows(rng, size, seen)
        write_atomically(out / f"{split}.jsonl", "".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main()
