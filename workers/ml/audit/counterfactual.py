"""Counterfactual inputs: the same text with group words swapped (he <-> she, his -> her, man <-> woman...)."""

from __future__ import annotations

import re
from collections.abc import Sequence

# After these words (or punctuation, or the end) "her" is an object pronoun ("told her that", "saw her.") and
# becomes "him"; elsewhere it is a possessive ("her book") and becomes "his".
_OBJECT_FOLLOWERS = frozenset(
    {
        "a",
        "an",
        "the",
        "that",
        "this",
        "these",
        "those",
        "to",
        "and",
        "or",
        "but",
        "nor",
        "in",
        "on",
        "at",
        "for",
        "with",
        "from",
        "about",
        "as",
        "if",
        "so",
        "up",
        "out",
        "off",
        "back",
        "again",
        "too",
        "when",
        "because",
        "while",
        "until",
        "into",
        "onto",
        "over",
        "after",
        "before",
        "by",
        "than",
        "then",
        "there",
        "here",
    }
)
_AMBIGUOUS_HER = "her"


class WordSwapper:
    """Swaps each word of ``pairs`` with its partner, both ways, on word boundaries, keeping the case pattern.

    A word in several pairs maps to its partner in the first pair that names it, except "her", which becomes
    "him" or "his" depending on the next word.
    """

    def __init__(self, pairs: Sequence[tuple[str, str]]):
        self.pairs = tuple((str(first).lower(), str(second).lower()) for first, second in pairs)
        mapping: dict[str, str] = {}
        for first, second in self.pairs:
            mapping.setdefault(first, second)
            mapping.setdefault(second, first)
        self._mapping = mapping
        self._resolve_her = mapping.get(_AMBIGUOUS_HER) in {"him", "his"} and "him" in mapping and "his" in mapping
        alternatives = "|".join(re.escape(word) for word in sorted(mapping, key=lambda word: (-len(word), word)))
        # Not inside a longer word: "heather" keeps its "he"; an apostrophe is a boundary, so "he's" -> "she's".
        self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    def swap(self, text: str) -> str:
        """``text`` with every listed word replaced by its partner ("He said his" -> "She said her")."""
        return self._pattern.sub(lambda match: self._replacement(match, text), text)

    def has_swappable_word(self, text: str) -> bool:
        return self._pattern.search(text) is not None

    def _replacement(self, match: re.Match[str], text: str) -> str:
        word = match.group(0)
        partner = self._mapping[word.lower()]
        if word.lower() == _AMBIGUOUS_HER and self._resolve_her:
            following = re.match(r"\s*([A-Za-z]+)", text[match.end() :])
            partner = "him" if following is None or following.group(1).lower() in _OBJECT_FOLLOWERS else "his"
        return _with_case_of(word, partner)


def _with_case_of(original: str, replacement: str) -> str:
    if original.isupper() and len(original) > 1:
        return replacement.upper()
    if original[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


def swapper_for(pairs: Sequence[tuple[str, str]] | None = None) -> WordSwapper:
    """A swapper for ``pairs``, or for the project's gendered word pairs when None."""
    if pairs is None:
        from workers.ml.audit.prompts import counterfactual_pairs

        pairs = counterfactual_pairs()
    return WordSwapper(pairs)


def swap_group_words(text: str, pairs: Sequence[tuple[str, str]] | None = None) -> str:
    """``text`` with group words swapped both ways, case-preserving, on word boundaries ("heather" is untouched)."""
    return swapper_for(pairs).swap(text)
