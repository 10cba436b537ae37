"""Abbreviation expansion (issue 7): replace a mention that is a short form by the long form that the same
document defines for it, found with the Schwartz-Hearst algorithm (PyPI package ``abbreviations``).

Abbreviations are the main error source of name-based linkers ("MJD" has no dictionary name), and their
long forms are defined in the same abstract ("Machado-Joseph disease (MJD)"), so the expansion uses only
the document itself: no gold data, no dictionary.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache

from datasets import Dataset

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")


def _extract_pairs(text: str) -> dict[str, str]:
    # The package calls logging.basicConfig(level=INFO) at import; give the root logger a handler for the
    # duration of the import so that this call is a no-op and the application's logging stays untouched.
    root = logging.getLogger()
    guard = logging.NullHandler()
    root.addHandler(guard)
    try:
        from abbreviations import schwartz_hearst
    finally:
        root.removeHandler(guard)
    return schwartz_hearst.extract_abbreviation_definition_pairs(doc_text=text, first_definition=True)


@lru_cache(maxsize=4096)
def abbreviation_map(text: str) -> dict[str, str]:
    """Short form -> long form pairs defined in ``text``.

    The text is split into sentences first: the package treats each line as one sentence and gives up on
    a whole line when its parentheses are unbalanced, which would lose every definition of an abstract.
    The first definition of a short form wins.
    """
    sentences = "\n".join(_SENTENCE_END.split(text))
    return {str(short): str(long) for short, long in _extract_pairs(sentences).items()}


def expand_mention(mention: str, text: str) -> str:
    """The long form of ``mention`` if it is (exactly, after stripping) a short form defined in ``text``."""
    return abbreviation_map(text).get(mention.strip(), mention)


def add_query_column(mentions: Dataset, expand_abbreviations: bool) -> tuple[Dataset, int]:
    """Add the ``query`` column (the text that is linked): the mention, or its expansion when asked.

    Returns the dataset and the number of mentions that were expanded.
    """
    if not expand_abbreviations:
        return mentions.add_column("query", list(mentions["mention"])), 0
    queries = [expand_mention(m, t) for m, t in zip(mentions["mention"], mentions["text"])]
    expanded = sum(q != m for q, m in zip(queries, mentions["mention"]))
    return mentions.add_column("query", queries), expanded
