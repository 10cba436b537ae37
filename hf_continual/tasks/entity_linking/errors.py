"""Errors raised by the entity-linking readers; every message names the file and the 1-based line."""

from __future__ import annotations

from pathlib import Path


class DataFormatError(ValueError):
    """A malformed line in a corpus or vocabulary file; ``path`` and ``line_number`` locate it."""

    def __init__(self, path: str | Path, line_number: int, reason: str, line: str | None = None) -> None:
        self.path = str(path)
        self.line_number = line_number
        self.reason = reason
        shown = "" if line is None else f": {line[:200]!r}"
        super().__init__(f"{self.path}:{line_number}: {reason}{shown}")


class PubTatorFormatError(DataFormatError):
    """A malformed line in a PubTator corpus file."""


class DictionaryFormatError(DataFormatError):
    """A malformed line in a concept vocabulary (MEDIC or MeSH TSV) file."""
