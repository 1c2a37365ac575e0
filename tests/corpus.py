"""A small, varied English corpus generated in code (no data files in git, nothing downloaded)."""

import random

_SUBJECTS = ["The cat", "A small dog", "The old sailor", "My neighbour", "The engineer", "A quiet child", "The river"]
_VERBS = ["watches", "follows", "paints", "remembers", "carries", "finds", "builds", "answers"]
_OBJECTS = ["the morning light", "a red kite", "the long road", "an empty boat", "the last letter", "a warm loaf"]
_ENDINGS = ["before dawn.", "in the rain.", "without a word.", "near the harbour.", "after supper.", "every day."]


def english_corpus(sentences: int = 400, seed: int = 7) -> str:
    rng = random.Random(seed)
    lines = [
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}"
        for _ in range(sentences)
    ]
    return "\n".join(lines) + "\n"
