"""The demo's dataset: short review sentences whose sentiment is often negated.

Label 1 = the writer liked the thing, 0 = did not. Half the sentences wrap the sentiment word in a
negation ("the soup was not great"), which a frozen mean-pooled sentence encoder reads mostly by the
adjective, so its zero-shot read-out is clearly imperfect and there is something to learn.

The held-out split shares no sentence frame, adjective or noun with the training split: a score on
it measures whether an adapter learned to read negation, not whether it memorised the training words.
Only the negators themselves ("not", "never", …) appear in both. Everything is generated from the
lists below with a fixed seed, so the data are identical on every run.
"""

from __future__ import annotations

import random

# (frame, negated): "{n}" is a noun, "{a}" an adjective; a negated frame flips the adjective's polarity.
TRAIN_FRAMES = [
    ("the {n} was {a}.", False),
    ("the {n} was not {a}.", True),
    ("i found the {n} {a}.", False),
    ("i did not find the {n} {a}.", True),
    ("honestly, the {n} is {a}.", False),
    ("honestly, the {n} is not {a}.", True),
    ("we thought the {n} was really {a}.", False),
    ("the {n} was never {a}.", True),
    ("everyone agreed the {n} was {a}.", False),
    ("nobody thought the {n} was {a}.", True),
]
HELDOUT_FRAMES = [
    ("my friends said the {n} was {a}.", False),
    ("my friends said the {n} was not {a}.", True),
    ("to be fair, this {n} felt {a}.", False),
    ("to be fair, this {n} never felt {a}.", True),
    ("overall the {n} seemed {a} to me.", False),
    ("overall the {n} did not seem {a} to me.", True),
]
TRAIN_WORDS = {
    "pos": ["good", "great", "excellent", "wonderful", "delightful", "pleasant", "lovely", "superb", "fantastic", "enjoyable"],
    "neg": ["bad", "terrible", "awful", "horrible", "dreadful", "poor", "disappointing", "unpleasant", "boring", "mediocre"],
    "noun": ["movie", "food", "service", "hotel", "book", "concert", "staff", "coffee", "room", "game"],
}
HELDOUT_WORDS = {
    "pos": ["amazing", "brilliant", "charming", "marvelous", "outstanding", "impressive", "splendid", "terrific"],
    "neg": ["dull", "lousy", "disgusting", "awkward", "miserable", "bland", "annoying", "pathetic"],
    "noun": ["pizza", "album", "flight", "show", "lecture", "car", "phone", "museum"],
}
# The zero-shot read-out: cosine similarity of a sentence embedding to each label's description.
LABEL_TEXTS = ["this is a negative review.", "this is a positive review."]


def _sample(frames, words, n: int, rng: random.Random) -> tuple[list[str], list[int]]:
    """n sentences, balanced over (frame, polarity) cells, no duplicates."""
    cells = [(f, neg, pol) for f, neg in frames for pol in ("pos", "neg")]
    per_cell = -(-n // len(cells))
    seen, out = set(), []
    for frame, negated, pol in cells:
        pool = [(frame.format(n=noun, a=adj), int((pol == "pos") != negated)) for adj in words[pol] for noun in words["noun"]]
        rng.shuffle(pool)
        picked = [p for p in pool if p[0] not in seen][:per_cell]
        seen.update(s for s, _ in picked)
        out.extend(picked)
    rng.shuffle(out)
    out = out[:n]
    return [s for s, _ in out], [y for _, y in out]


def make(n_train: int = 320, n_test: int = 192, seed: int = 0) -> dict[str, tuple[list[str], list[int]]]:
    """{"train": (sentences, labels), "test": (sentences, labels)}: deterministic for a seed."""
    rng = random.Random(seed)
    return {
        "train": _sample(TRAIN_FRAMES, TRAIN_WORDS, n_train, rng),
        "test": _sample(HELDOUT_FRAMES, HELDOUT_WORDS, n_test, rng),
    }
