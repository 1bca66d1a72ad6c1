"""Regenerate the chat quickstart dataset: `python presets/data/make_quickstart_chat.py` (stdlib only, seeded).

Short conversations (`messages` JSONL) on one narrow, checkable skill: the user writes a sentence
with a date in everyday English ("the 5th of March, 2024", "Mar 5 2024", ...) and the assistant
replies with that date in ISO 8601 and nothing else ("2024-03-05"). Half the conversations have a
second turn ("And this one? ..."), so the reply that is scored may follow an earlier exchange. The
answer is deterministic, so exact match measures the skill; no sentence appears in two splits.
"""

import calendar
import json
import random
from pathlib import Path

from make_quickstart import write_atomically  # the script's own folder is on sys.path

SYSTEM = "Convert the date in the user's message to ISO 8601 (YYYY-MM-DD). Reply with the date only."
EVENTS = ["The invoice was paid on {date}.", "We moved house on {date}.", "My sister was born on {date}.",
          "The contract ends on {date}.", "Our flight leaves on {date}.", "The museum reopened on {date}.",
          "I started this job on {date}.", "The package arrived on {date}.", "The concert is on {date}.",
          "The bridge was finished on {date}.", "Please renew the licence before {date}.",
          "The exam takes place on {date}.", "They got married on {date}.", "The store opened on {date}.",
          "Rent is due on {date}.", "The last meeting was held on {date}."]
FOLLOW_UPS = ["And this one? {sentence}", "Now this: {sentence}", "Same again: {sentence}", "Next: {sentence}"]
SECOND_TURN_SHARE = 0.5
SIZES = {"train": 320, "validation": 40, "test": 60}
SEED = 20250207


def ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def spoken_date(rng: random.Random, year: int, month: int, day: int) -> str:
    name, short = calendar.month_name[month], calendar.month_abbr[month]
    forms = [f"{name} {day}, {year}", f"{day} {name} {year}", f"the {ordinal(day)} of {name}, {year}",
             f"{short} {day} {year}", f"{name} {ordinal(day)}, {year}"]
    return rng.choice(forms)


def dated_sentence(rng: random.Random) -> tuple[str, str]:
    year, month = rng.randint(1990, 2030), rng.randint(1, 12)
    day = rng.randint(1, calendar.monthrange(year, month)[1])
    sentence = rng.choice(EVENTS).format(date=spoken_date(rng, year, month, day))
    return sentence, f"{year:04d}-{month:02d}-{day:02d}"


def conversation(rng: random.Random, seen: set[str]) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}]
    for turn in range(2 if rng.random() < SECOND_TURN_SHARE else 1):
        sentence, iso = dated_sentence(rng)
        while sentence in seen:
            sentence, iso = dated_sentence(rng)
        seen.add(sentence)
        user = sentence if turn == 0 else rng.choice(FOLLOW_UPS).format(sentence=sentence)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": iso}]
    return messages


def main() -> None:
    rng = random.Random(SEED)
    out = Path(__file__).resolve().parent / "quickstart-chat"
    out.mkdir(exist_ok=True)
    seen: set[str] = set()
    for split, size in SIZES.items():
        rows = [{"messages": conversation(rng, seen)} for _ in range(size)]
        write_atomically(out / f"{split}.jsonl", "".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main()
