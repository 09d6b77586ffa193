"""A seeded synthetic sentiment task that needs more than keyword spotting: negations flip the polarity,
a concessive clause carries a distractor of the opposite polarity, and intensifiers add noise."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

from peftlab.io import atomic_write

SUBJECTS = ["the movie", "the food", "the service", "this phone", "the hotel", "the book", "the concert",
            "the staff", "the game", "the app", "the room", "the coffee", "the trip", "the lecture", "the show"]
POSITIVE = ["great", "wonderful", "excellent", "delightful", "amazing", "superb", "pleasant", "fantastic",
            "enjoyable", "brilliant", "lovely", "impressive"]
NEGATIVE = ["terrible", "awful", "boring", "disappointing", "dreadful", "poor", "horrible", "bland",
            "annoying", "mediocre", "painful", "unpleasant"]
INTENSIFIERS = ["", "", "really ", "truly ", "quite ", "absolutely ", "rather "]
NEGATIONS = ["not ", "never ", "hardly "]
CONCESSIONS = ["although {s} was {a}", "even though {s} seemed {a}", "despite {s} being {a}"]
OPENERS = ["", "", "honestly, ", "to be fair, ", "overall, ", "in the end, "]


def _clause(rng: random.Random, subject: str, positive: bool, allow_negation: bool) -> str:
    negated = allow_negation and rng.random() < 0.35
    word = rng.choice(POSITIVE if positive != negated else NEGATIVE)
    return f"{subject} was {rng.choice(NEGATIONS) if negated else ''}{rng.choice(INTENSIFIERS)}{word}"


def sentiment_example(rng: random.Random) -> dict[str, str]:
    positive = rng.random() < 0.5
    subject = rng.choice(SUBJECTS)
    main = _clause(rng, subject, positive, allow_negation=True)
    if rng.random() < 0.4:  # a distractor of the opposite polarity, in a subordinate clause
        other = rng.choice([s for s in SUBJECTS if s != subject])
        distractor = rng.choice(CONCESSIONS).format(s=other, a=rng.choice(NEGATIVE if positive else POSITIVE))
        text = f"{distractor}, {main}"
    else:
        text = main
    text = rng.choice(OPENERS) + text + "."
    return {"text": text[0].upper() + text[1:], "label": "positive" if positive else "negative"}


def summary_example(rng: random.Random) -> dict[str, str]:
    """A dialogue-like line of words and its summary: the subjects it mentions, in order."""
    subjects = [s.split()[-1] for s in SUBJECTS]
    words = [rng.choice(subjects + POSITIVE + NEGATIVE) for _ in range(12)]
    summary = " ".join(w for w in words if w in subjects) or "nothing"
    return {"dialogue": " ".join(words), "summary": summary}


TASKS = {"sentiment": sentiment_example, "summary": summary_example}


def generate(task: str, n: int, seed: int) -> list[dict[str, str]]:
    """`n` examples of `task`, the same for the same seed."""
    return list(stream(task, n, seed))


def stream(task: str, n: int, seed: int) -> Iterator[dict[str, str]]:
    """The examples of `generate`, one at a time (a large -n never sits in memory)."""
    rng = random.Random(seed)
    return (TASKS[task](rng) for _ in range(n))


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    """Rows as JSON lines, written to a temporary file and renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    atomic_write(path, write)
    return path


def summary_rows(n: int, source_words: int, target_words: int, seed: int) -> list[dict[str, str]]:
    """Dialogue-like rows of at least the given lengths (truncation then gives exact token counts): the
    summary is the dialogue's subject words in order, so there is something to learn."""
    rng = random.Random(seed)
    words = [w.split()[-1] for w in SUBJECTS] + POSITIVE + NEGATIVE
    rows = []
    for _ in range(n):
        dialogue = [rng.choice(words) for _ in range(source_words)]
        rows.append({"dialogue": "summarize: " + " ".join(dialogue),
                     "summary": " ".join((dialogue * (1 + target_words // max(source_words, 1)))[:target_words])})
    return rows
