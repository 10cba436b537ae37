"""Cheap lexical retriever: TF-IDF over character 3-grams (``char_wb``) of dictionary names.

Used to mine hard negatives for training and as a baseline linker. Queries and names are expected to be
normalised with :func:`~.dictionary.normalize_name` already (the dictionary stores them that way).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ...progress import progress


class TfidfRetriever:
    """Top-k nearest names by cosine similarity of char-n-gram TF-IDF vectors (rows are L2-normalised)."""

    def __init__(
        self,
        names: Sequence[str],
        ngram_range: tuple[int, int] = (3, 3),
        max_block_cells: int = 20_000_000,
        show_progress: bool | None = None,
    ) -> None:
        """``show_progress``: bars while the index is built and searched (see :mod:`hf_continual.progress`;
        default: on a terminal)."""
        from sklearn.feature_extraction.text import TfidfVectorizer  # here: importing sklearn takes seconds

        self.names = list(names)
        self.show_progress = show_progress
        self.vectorizer = TfidfVectorizer(
            analyzer="char_wb", ngram_range=ngram_range, lowercase=True, dtype=np.float32
        )
        # one pass over the names counts the n-grams (the slow part): the bar follows it
        names_bar = progress(self.names, desc="TF-IDF index", show=show_progress, unit="name")
        self.matrix = self.vectorizer.fit_transform(names_bar).tocsr()
        self.max_block_cells = max_block_cells
        self._names_t = None

    def __len__(self) -> int:
        return len(self.names)

    def transform(self, queries: Sequence[str]):
        """Sparse TF-IDF rows (L2-normalised) for ``queries``."""
        return self.vectorizer.transform(list(queries))

    def topk(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices [Q, k] of the best names per query (best first) and their cosine scores [Q, k].

        Queries are scored in blocks so that a dense block stays below ``max_block_cells`` floats.
        """
        k = min(k, len(self.names))
        q = self.transform(queries)
        out_idx = np.zeros((q.shape[0], k), dtype=np.int64)
        out_score = np.zeros((q.shape[0], k), dtype=np.float32)
        block = max(1, self.max_block_cells // max(1, len(self.names)))
        # CSR of the transpose, made once: a CSC operand is converted on every product
        if self._names_t is None:
            self._names_t = self.matrix.T.tocsr()
        names_t = self._names_t
        starts = range(0, q.shape[0], block)
        for lo in progress(starts, desc="TF-IDF top-k", show=self.show_progress, unit="block"):
            scores = (q[lo : lo + block] @ names_t).toarray()
            part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            part_scores = np.take_along_axis(scores, part, axis=1)
            order = np.argsort(-part_scores, axis=1, kind="stable")
            out_idx[lo : lo + block] = np.take_along_axis(part, order, axis=1)
            out_score[lo : lo + block] = np.take_along_axis(part_scores, order, axis=1)
        return out_idx, out_score
