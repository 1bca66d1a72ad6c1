"""Regenerate the quickstart dataset: `python presets/data/make_quickstart.py`.

Short product reviews built from templates, two balanced labels. Negation ("not great") flips the
label and 8% of the labels are flipped at random, so a bag of words is not enough and a perfect
score is not possible: the majority baseline is 50%, a good classifier lands around 85-90%.
"""

import json
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
NOISE = 0.08


def review(rng: random.Random) -> dict:
    positive = rng.random() < 0.5
    negated = rng.random() < 0.3
    quality = rng.choice(NEGATIVE if positive == negated else POSITIVE)
    template = rng.choice(NEGATED if negated else TEMPLATES)
    text = template.format(product=rng.choice(PRODUCTS), quality=quality) + rng.choice(FILLERS)
    if rng.random() < NOISE:
        positive = not positive
    return {"text": text, "label": "positive" if positive else "negative"}


def main() -> None:
    rng = random.Random(20240301)
    out = Path(__file__).resolve().parent / "quickstart"
    out.mkdir(exist_ok=True)
    for split, size in (("train", 800), ("validation", 200), ("test", 200)):
        rows = [review(rng) for _ in range(size)]
        (out / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


if __name__ == "__main__":
    main()
