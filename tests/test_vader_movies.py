"""The VADER movie-snippet set: built deterministically, split as the Rotten Tomatoes set it shares snippets with."""

import importlib.util
import io
import json
import random
import tarfile
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent.parent / "presets" / "data"
SPLITS = ("train", "validation", "test")


def load_builder():
    spec = importlib.util.spec_from_file_location("make_vader_movies", DATA / "make_vader_movies.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


builder = load_builder()


def add_file(archive: tarfile.TarFile, name: str, content: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    archive.addfile(info, io.BytesIO(content))


def write_sdist(path: Path, lines: list[str]) -> None:
    """A source distribution shaped like vaderSentiment's: the snippets in a tarball inside the tarball."""
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as archive:
        add_file(archive, builder.MEMBER, "\r\n".join(lines).encode("utf-8"))
    with tarfile.open(path, mode="w:gz") as archive:
        add_file(archive, "vaderSentiment-3.3.2/setup.py", b"")
        add_file(archive, f"vaderSentiment-3.3.2/{builder.ARCHIVE}", inner.getvalue())


# Rotten Tomatoes' copy of a snippet and VADER's differ in case, punctuation and spacing.
SHARED = {
    "train": [("A gorgeous, witty, seductive movie.", "a gorgeous witty   seductive movie"),
              ("Hollywood -- at its worst.", "Hollywood    at its worst ."),
              ("co-writer/director Jackson's vision", "co writer/director Jackson's vision")],
    "validation": [("The plot is nothing but boilerplate clichés.", "the plot is nothing but boilerplate clichés")],
    "test": [("Too long; too slow.", "too long, too slow"),
             ("''Conan'' is back!", "'Conan' is back!")],
}


def corpus(tmp_path: Path, order_seed: int) -> tuple[Path, Path]:
    rotten_tomatoes = tmp_path / "rotten-tomatoes"
    rotten_tomatoes.mkdir(exist_ok=True)
    for split in SPLITS:
        rows = [{"text": ours, "label": "fresh"} for ours, _ in SHARED[split]] + [{"text": f"only in {split}", "label": "plot"}]
        (rotten_tomatoes / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    snippets = [theirs for split in SPLITS for _, theirs in SHARED[split]]
    snippets += [f"free snippet number {index}" for index in range(20)]
    lines = [f"{index}\t{index / 10 - 1:.2f}\t{text}" for index, text in enumerate(snippets)]
    lines += ["90\t1.5\tSame text, same rating", "91\t1.5\tsame text same rating",
              "92\t2.0\tSame text, two ratings", "93\t-1.0\tsame text, two ratings"]
    random.Random(order_seed).shuffle(lines)
    sdist = tmp_path / f"vaderSentiment-{order_seed}.tar.gz"
    write_sdist(sdist, lines)
    return sdist, rotten_tomatoes


def test_builder_is_deterministic_and_keeps_shared_snippets_in_their_rotten_tomatoes_split(tmp_path):
    sizes = {"train": 12, "validation": 6, "test": 9}  # every snippet: 6 shared, 20 free, 1 of the same-rating pair
    sdist, rotten_tomatoes = corpus(tmp_path, order_seed=0)
    first = builder.build(sdist, rotten_tomatoes, sizes)
    assert builder.build(sdist, rotten_tomatoes, sizes) == first
    shuffled_sdist, _ = corpus(tmp_path, order_seed=1)  # the same snippets in another order: the same splits
    shuffled = builder.build(shuffled_sdist, rotten_tomatoes, sizes)
    assert {split: sorted(map(json.dumps, rows)) for split, rows in shuffled.items()} == \
        {split: sorted(map(json.dumps, rows)) for split, rows in first.items()}

    texts = {split: [row["text"] for row in rows] for split, rows in first.items()}
    assert {split: len(rows) for split, rows in texts.items()} == sizes
    for split in SPLITS:
        for _, theirs in SHARED[split]:
            assert " ".join(theirs.split()) in texts[split], (theirs, split)
    every = [text for rows in texts.values() for text in rows]
    assert len(every) == len(set(every))
    assert "Same text, same rating" in every or "same text same rating" in every
    assert not any("two ratings" in text for text in every)
    assert isinstance(first["train"][0]["label"], float)


def test_a_different_seed_draws_other_free_snippets_but_the_same_shared_ones(tmp_path):
    sizes = {"train": 12, "validation": 6, "test": 9}  # every snippet: 6 shared, 20 free, 1 of the same-rating pair
    sdist, rotten_tomatoes = corpus(tmp_path, order_seed=0)
    one, other = builder.build(sdist, rotten_tomatoes, sizes, seed=1), builder.build(sdist, rotten_tomatoes, sizes, seed=2)
    assert {row["text"] for row in one["train"]} != {row["text"] for row in other["train"]}
    for split in SPLITS:
        shared = {" ".join(theirs.split()) for _, theirs in SHARED[split]}
        assert shared <= {row["text"] for row in one[split]} and shared <= {row["text"] for row in other[split]}


def test_too_many_shared_snippets_for_a_split_is_refused(tmp_path):
    sdist, rotten_tomatoes = corpus(tmp_path, order_seed=0)
    with pytest.raises(SystemExit, match="3 shared snippets are in Rotten Tomatoes' train, more than its size 2"):
        builder.build(sdist, rotten_tomatoes, {"train": 2, "validation": 6, "test": 9})


def read_split(folder: str, split: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def test_shipped_set_keeps_every_rotten_tomatoes_snippet_in_its_split():
    rotten_tomatoes = {builder.match_key(row["text"]): split for split in SPLITS for row in read_split("rotten-tomatoes", split)}
    seen: dict[str, str] = {}
    shared = 0
    for split in SPLITS:
        rows = read_split("vader-movies", split)
        assert len(rows) == builder.SIZES[split]
        for row in rows:
            key = builder.match_key(row["text"])
            assert key not in seen, f"{row['text']!r} is in {seen[key]} and {split}"
            seen[key] = split
            assert -4.0 <= row["label"] <= 4.0
            if key in rotten_tomatoes:
                assert rotten_tomatoes[key] == split, row["text"]
                shared += 1
    assert shared > 1000  # most snippets are shared: the check above has something to check
