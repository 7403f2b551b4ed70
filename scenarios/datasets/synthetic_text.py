"""Test-sized text stream: sentences from per-task topic words and per-class cue words (real English words,
so a real sentence encoder separates tasks). No files. Seeded."""
from __future__ import annotations

import random

N_CLASSES_PER_TASK = 2
# (task name, topic words, cue words of each class)
TOPICS = [
    ("sports", ["football", "match", "goal", "team", "league", "coach"], [["won", "victory", "champion"], ["lost", "defeat", "injury"]]),
    ("food", ["restaurant", "dinner", "chef", "menu", "pizza", "dessert"], [["delicious", "tasty", "wonderful"], ["awful", "cold", "bland"]]),
    ("science", ["physics", "experiment", "laboratory", "atoms", "telescope", "theory"], [["discovery", "breakthrough", "proof"], ["error", "retraction", "failure"]]),
]


def make_texts(task: int, n_per_class: int, seed: int) -> tuple[list[str], list[int]]:
    """`n_per_class` sentences for each of task `task`'s two classes; labels are local (0/1)."""
    _, topic, classes = TOPICS[task % len(TOPICS)]
    rng = random.Random(seed * 1000 + task)
    texts, labels = [], []
    for c, cues in enumerate(classes):
        for _ in range(n_per_class):
            words = rng.sample(topic, 3) + rng.sample(cues, 2)
            rng.shuffle(words)
            texts.append("the " + " ".join(words))
            labels.append(c)
    return texts, labels
