"""Shared capture of layer inputs and output gradients for Fisher collectors.

A :class:`LayerCapture` puts a forward hook on each module it is given. For every call of a module during the
estimator's forward it keeps one :class:`Record`: the module's (detached) first input, its output, and, once the
estimator has run a backward pass, the gradient of the summed per-example losses w.r.t. that output. Because
examples do not interact in eval mode, the slice of that output gradient belonging to example ``n`` is the
gradient of example ``n``'s own loss: everything a collector needs to form exact per-example quantities.

Rows and examples. A module sees tensors ``[R, ..., d]``. For ordinary models ``R`` is the number of examples
``B``; a dual encoder may run its encoder on ``B * r`` rows where the ``r`` rows of one example are contiguous.
:meth:`Record.grouped` reshapes ``[R, ..., d] -> [B, (R // B) * ..., d]`` so each leading index is one example.

Broadcast embeddings. BERT looks its position embeddings up with ``position_ids`` of shape ``[1, T]``: the output
``[1, T, d]`` is broadcast over the batch and its gradient is summed over examples. With
``expand_broadcast=True`` the hook of an ``nn.Embedding`` returns the output expanded to ``[rows, T, d]`` (a view:
same numbers), so its gradient stays per row. (Other modules are never expanded: a leading size that is not a
multiple of the batch's examples raises in :attr:`Record.rows_per_example` instead of being silently wrong.) ``rows`` is the leading size of the last hooked output of the same forward (the word
or token-type embeddings in BERT), else ``num_examples * rows_per_example`` of the batch.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

_PAUSED = False


@contextlib.contextmanager
def capture_paused() -> Iterator[None]:
    """Within this context no :class:`LayerCapture` records anything (used for the estimator's fallback loop).

    Collectors that register their own hooks instead of using :class:`LayerCapture` should check
    :func:`is_capture_paused`.
    """
    global _PAUSED
    previous, _PAUSED = _PAUSED, True
    try:
        yield
    finally:
        _PAUSED = previous


def is_capture_paused() -> bool:
    """True inside :func:`capture_paused`."""
    return _PAUSED


@dataclass
class Record:
    """One call of a hooked module in the current batch."""

    name: str
    module: nn.Module
    input: torch.Tensor  #: first positional input, detached (ids for an Embedding)
    output: torch.Tensor  #: output tensor (the autograd target); ``[R, ..., d]``
    num_examples: int
    #: d(sum of per-example losses)/d(output) after a backward (None if the loss does not depend on it). Fired by a
    #: tensor hook, so it is correct even if the model later modifies the output in place.
    grad: torch.Tensor | None = None
    token_mask: torch.Tensor | None = field(default=None, repr=False)  #: ``[R, T]`` bool or None

    @property
    def rows(self) -> int:
        """Leading size ``R`` of the output."""
        return self.output.shape[0]

    @property
    def rows_per_example(self) -> int:
        """``R // B`` (checked to divide exactly)."""
        r, b = self.rows, self.num_examples
        if b <= 0 or r % b:
            raise RuntimeError(
                f"module {self.name!r}: leading size {r} is not a multiple of the {b} examples of the batch; "
                "the Fisher estimator needs the rows of one example contiguous along dim 0"
            )
        return r // b

    def grouped(self, t: torch.Tensor) -> torch.Tensor:
        """Reshape ``[R, ..., d]`` (``R`` rows) to ``[B, n, d]``: all positions of one example along dim 1."""
        self.rows_per_example  # noqa: B018  (validates R % B)
        return t.reshape(self.num_examples, -1, t.shape[-1])

    def grouped_mask(self) -> torch.Tensor | None:
        """Token mask grouped like :meth:`grouped` (``[B, n]`` bool), or None when it cannot be aligned.

        Aligned when the module's input is ``[R, T, d]`` and the batch attention mask has ``R * T`` entries.
        """
        if self.token_mask is None:
            return None
        return self.token_mask.reshape(self.num_examples, -1)


class LayerCapture:
    """Forward hooks on named modules that record :class:`Record` s per batch (see module docstring).

    Typical use inside a collector::

        self.capture = LayerCapture({n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        self.capture.attach()                       # in attach()
        self.capture.begin_batch(b, r, mask)        # in begin_batch()
        for rec in self.capture.records: ...        # in after_backward(): rec.input, rec.grad, rec.grouped(...)
        self.capture.grad_targets()                 # in grad_targets()
        self.capture.detach()                       # in detach()
    """

    def __init__(self, modules: Mapping[str, nn.Module], *, expand_broadcast: bool = False) -> None:
        self.modules = dict(modules)
        self.expand_broadcast = expand_broadcast
        self.records: list[Record] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._num_examples = 0
        self._rows = 0
        self._mask: torch.Tensor | None = None

    def attach(self) -> None:
        """Register the forward hooks."""
        if self._handles:
            return
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._make_hook(name), with_kwargs=True))

    def detach(self) -> None:
        """Remove the hooks and drop the records."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.records.clear()

    def begin_batch(
        self, num_examples: int, rows_per_example: int, attention_mask: torch.Tensor | None
    ) -> None:
        """Forget the previous batch's records; remember the batch geometry."""
        self.records.clear()
        self._num_examples = num_examples
        self._rows = num_examples * rows_per_example
        self._mask = None if attention_mask is None else attention_mask.detach().bool()

    def grad_targets(self) -> list[torch.Tensor]:
        """Outputs that need a gradient in the coming backward."""
        return [r.output for r in self.records if r.output.requires_grad]

    def clear_grads(self) -> None:
        """Drop the captured output gradients (call after consuming them, before the next backward)."""
        for r in self.records:
            r.grad = None

    def _row_mask(self, inp: torch.Tensor, rows: int) -> torch.Tensor | None:
        m = self._mask
        if m is None or inp.dim() < 2 or inp.is_floating_point() and inp.dim() < 3:
            return None
        tokens = inp.shape[1]
        if m.numel() != rows * tokens:
            return None
        return m.reshape(rows, tokens)

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> torch.Tensor | None:
            if _PAUSED or not isinstance(output, torch.Tensor):
                return None
            first = args[0] if args else next(iter(kwargs.values()), None)
            if not isinstance(first, torch.Tensor):
                raise RuntimeError(f"LayerCapture: cannot find the input tensor of module {name!r}")
            inp = first.detach()
            new_output = None
            if (
                self.expand_broadcast
                and isinstance(module, nn.Embedding)
                and output.dim() >= 2
                and output.shape[0] == 1
                and self._rows > 1
            ):
                output = new_output = output.expand(self._rows, *output.shape[1:])
                if inp.dim() >= 1 and inp.shape[0] == 1:
                    inp = inp.expand(self._rows, *inp.shape[1:])
            if output.dim() >= 2:
                self._rows = output.shape[0]
            rec = Record(name, module, inp, output, self._num_examples)
            if output.requires_grad:
                rec.token_mask = self._row_mask(inp, output.shape[0])

                # a weak reference: a strong one would close the cycle output -> hook -> record -> output
                # through C++ (invisible to Python's GC) and keep every batch's autograd graph alive
                ref = weakref.ref(rec)

                def grad_hook(g: torch.Tensor, ref: weakref.ref[Record] = ref) -> None:
                    target = ref()
                    if target is not None:
                        target.grad = g

                output.register_hook(grad_hook)
            self.records.append(rec)
            return new_output

        return hook
