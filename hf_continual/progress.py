"""Progress bars for the long steps outside the Trainer (dictionary loading, TF-IDF index, ...).

One switch for all of them: ``show=None`` (the default) shows a bar when stderr is a terminal and the
``transformers`` progress bars are enabled (``transformers.utils.logging.disable_progress_bar()``, which
``hf-continual --no-progress`` calls, turns them off); ``True``/``False`` force it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def progress(
    iterable: Iterable[Any] | None = None, *, desc: str, show: bool | None = None, **kwargs: Any
) -> tqdm:
    """A ``tqdm`` bar over ``iterable`` (or a manual one with ``total=``) following the switch above."""
    from transformers.utils import logging as hf_logging

    if show is None:
        disable = None if hf_logging.is_progress_bar_enabled() else True  # None: tqdm hides it off a terminal
    else:
        disable = not show
    return tqdm(iterable, desc=desc, disable=disable, **kwargs)
