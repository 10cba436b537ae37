"""FISH (Fisher-Induced Sparse uncHanging, Sung et al. 2021): update only the top-k Fisher entries.

* :func:`fish_mask` ranks parameters by their (empirical) Fisher on the new task's data and keeps the top
  ``keep_ratio`` share (global top-k, or per tensor), with optional always-trainable modules (new heads).
  With ``protect``, the score is the new-task Fisher relative to the consolidated old-task Fisher, so weights
  that earlier tasks depend on are avoided.
* :class:`MaskedUpdates` enforces the mask: gradients are multiplied by the mask in parameter hooks (before the
  all-reduce of DDP and before the optimizer); AdamW's decoupled weight decay (the only thing that moves an
  entry with a zero gradient and zero optimizer state) is moved off the frozen entries by regrouping the
  optimizer, or, for other optimizers, the frozen entries are copied back after each step.
* :func:`save_task_delta` / :func:`apply_task_delta` store only the changed entries of a task (flat indices and
  values, safetensors) and put them back onto the base model.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .state import _atomic_write

Masks = dict[str, torch.Tensor]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(p in name for p in patterns)


def fish_mask(
    fisher: Mapping[str, torch.Tensor],
    keep_ratio: float,
    scope: str = "global",
    always_trainable: Sequence[str] = (),
    old_fisher: Mapping[str, torch.Tensor] | None = None,
    eps: float = 1e-12,
) -> Masks:
    """Boolean masks (True = trainable) keeping ``keep_ratio`` of the entries of ``fisher``.

    ``scope="global"``: exactly ``k = round(keep_ratio * N)`` entries over all tensors (N = entries not in an
    always-trainable module; at least 1). ``scope="layer"``: the same ratio within each tensor. Parameters whose
    name contains one of ``always_trainable`` are fully trainable and do not count towards k. With
    ``old_fisher``, the score is ``F_new / (F_old + eps * mean(F_old))`` (protect mode).
    """
    if not (0.0 < keep_ratio <= 1.0):
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    scores: dict[str, torch.Tensor] = {}
    for name, f in fisher.items():
        s = f.detach().float()
        if old_fisher is not None and name in old_fisher:
            old = old_fisher[name].detach().float().to(s.device)
            s = s / (old + eps * float(old.mean()) + 1e-30)
        scores[name] = s
    masks: Masks = {}
    ranked = [n for n in scores if not _matches(n, always_trainable)]
    for name in scores:
        if name not in ranked:
            masks[name] = torch.ones_like(scores[name], dtype=torch.bool)
    if scope == "layer":
        for name in ranked:
            s = scores[name].reshape(-1)
            k = max(1, round(keep_ratio * s.numel()))
            m = torch.zeros_like(s, dtype=torch.bool)
            m[torch.topk(s, k, sorted=False).indices] = True
            masks[name] = m.view_as(scores[name])
        return masks
    if not ranked:
        return masks
    flat = torch.cat([scores[n].reshape(-1) for n in ranked])
    k = max(1, round(keep_ratio * flat.numel()))
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat, k, sorted=False).indices] = True
    offset = 0
    for name in ranked:
        n = scores[name].numel()
        masks[name] = keep[offset : offset + n].view_as(scores[name])
        offset += n
    return masks


def mask_hash(masks: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names and packed mask bits: equal hashes mean equal masks."""
    h = hashlib.sha256()
    for name in sorted(masks):
        h.update(name.encode())
        h.update(masks[name].to("cpu", torch.uint8).contiguous().numpy().tobytes())
    return h.hexdigest()


def check_same_mask_across_ranks(masks: Mapping[str, torch.Tensor]) -> None:
    """Raise if any process holds a different mask (no-op without an initialised process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    if world == 1:
        return
    digests: list[str | None] = [None] * world
    torch.distributed.all_gather_object(digests, mask_hash(masks))
    if len(set(digests)) != 1:
        raise RuntimeError(
            "FISH masks differ across processes (hash per rank: "
            + ", ".join(f"{r}={d[:12]}" for r, d in enumerate(digests))
            + "); the Fisher must be reduced across ranks before the mask is built"
        )


def mask_stats(masks: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Counts of trainable and total entries."""
    return {
        "trainable": int(sum(int(m.sum()) for m in masks.values())),
        "total": int(sum(m.numel() for m in masks.values())),
    }


class MaskedUpdates:
    """Keep every entry outside ``masks`` at its start value while a task trains.

    Gradients of frozen entries are zeroed in parameter hooks (:meth:`attach`). With zero gradients and fresh
    state, Adam/AdamW leave an entry exactly where it is, except for AdamW's decoupled weight decay
    ``p *= 1 - lr * wd``. :meth:`configure_optimizer` therefore moves the partially masked tensors into
    ``weight_decay=0`` copies of their parameter groups and :meth:`before_step_` applies the group's decay to
    their k trainable entries only (the same multiplication AdamW does first, so the result is bit-identical):
    no per-step pass over whole tensors. For any other optimizer (or one that already has state) the frozen
    entries are copied back after every step instead (:meth:`after_step_`), which is exact but costs a pass.
    """

    def __init__(self, params: Mapping[str, torch.nn.Parameter], masks: Masks) -> None:
        self.params = dict(params)
        # each mask where its parameter lives (a mask loaded from a file is on the CPU)
        self.masks = {n: m.to(self.params[n].device) if n in self.params else m for n, m in masks.items()}
        masks = self.masks
        self.start = {n: p.detach().clone() for n, p in self.params.items() if n in masks}
        self._handles = []
        # tensors with every entry trainable need no work; tensors with none get a zero gradient
        self._partial = [n for n, m in masks.items() if n in self.params and not bool(m.all())]
        self._float_masks = {n: masks[n].to(self.params[n].dtype) for n in self._partial}
        self.restore_each_step = True
        # (parameter, flat indices of its trainable entries, index of its optimizer group, weight decay)
        self._decay: list[tuple[torch.nn.Parameter, torch.Tensor, int, float]] = []
        self._optimizer: torch.optim.Optimizer | None = None

    def attach(self) -> None:
        """Mask gradients in parameter hooks: they run before accumulation and before DDP's all-reduce."""
        self.detach()
        for name in self._partial:
            fm = self._float_masks[name]
            self._handles.append(self.params[name].register_hook(lambda g, fm=fm: g * fm))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def configure_optimizer(self, optimizer: torch.optim.Optimizer) -> bool:
        """Make ``optimizer`` (before its first step and before its LR scheduler exists) keep frozen entries
        still by itself. Returns True when that worked and the per-step restore is off."""
        by_id = {id(self.params[n]): n for n in self._partial}
        groups = [g for g in optimizer.param_groups if any(id(p) in by_id for p in g["params"])]
        adam = isinstance(optimizer, torch.optim.Adam)  # AdamW subclasses Adam in torch >= 2.6
        for g in groups:
            decoupled = bool(g.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)))
            if not adam or (g["weight_decay"] != 0 and not decoupled):
                return False  # coupled decay / momentum-free guarantees unknown: keep the restore pass
        if any(optimizer.state.get(self.params[n]) for n in self._partial):
            return False
        moved_groups: list[tuple[dict[str, Any], list[torch.nn.Parameter], float]] = []
        for g in groups:
            moved = [p for p in g["params"] if id(p) in by_id]
            wd = float(g["weight_decay"])
            if wd != 0.0:
                g["params"] = [p for p in g["params"] if id(p) not in by_id]
                optimizer.add_param_group(
                    {**{k: v for k, v in g.items() if k != "params"}, "params": moved, "weight_decay": 0.0}
                )
                moved_groups.append((optimizer.param_groups[-1], moved, wd))
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
        # groups are found by index: accelerate re-creates the group dicts (optimizer.load_state_dict)
        self._optimizer, self._decay = optimizer, []
        for group, moved, wd in moved_groups:
            index = next(i for i, g in enumerate(optimizer.param_groups) if g is group)
            for p in moved:
                idx = self.masks[by_id[id(p)]].reshape(-1).nonzero().reshape(-1).to(p.device)
                self._decay.append((p, idx, index, wd))
        self.restore_each_step = False
        return True

    @torch.no_grad()
    def before_step_(self) -> None:
        """AdamW's decoupled weight decay on the trainable entries of the moved tensors (call right before
        ``optimizer.step()``; a step skipped by a fp16 GradScaler would still see this decay)."""
        if self._optimizer is None:
            return
        groups = self._optimizer.param_groups
        for p, idx, index, wd in self._decay:
            lr = groups[index]["lr"]
            factor = 1 - (float(lr) if torch.is_tensor(lr) else lr) * wd
            flat = p.data.view(-1)
            flat.index_copy_(0, idx, flat.index_select(0, idx).mul_(factor))

    @torch.no_grad()
    def after_step_(self) -> None:
        """Copy frozen entries back when the optimizer could not be configured to keep them still."""
        if self.restore_each_step:
            self.restore_()

    @torch.no_grad()
    def mask_grads_(self) -> None:
        """Zero the frozen entries of the current gradients (e.g. after a penalty gradient was added)."""
        grads = [self.params[n].grad for n in self._partial if self.params[n].grad is not None]
        masks = [self._float_masks[n] for n in self._partial if self.params[n].grad is not None]
        if grads:
            torch._foreach_mul_(grads, masks)

    @torch.no_grad()
    def restore_(self) -> None:
        """Copy the frozen entries back from their start values (one fused pass over partial tensors)."""
        for name in self._partial:
            p = self.params[name]
            p.copy_(torch.where(self.masks[name], p, self.start[name]))

    @torch.no_grad()
    def drifted(self) -> int:
        """Number of frozen entries that differ from their start value (0 unless something bypassed the
        optimizer, e.g. a user callback writing to the weights)."""
        return int(
            sum(int(((self.params[n] != self.start[n]) & ~self.masks[n]).sum()) for n in self._partial)
        )


def save_task_delta(
    model: torch.nn.Module, base: Mapping[str, torch.Tensor], path: str | os.PathLike
) -> dict[str, int]:
    """Write the entries of ``model`` that differ from ``base`` as flat indices + values (atomic safetensors).

    Returns ``{"entries", "delta_bytes", "full_bytes"}`` (``full_bytes``: a full checkpoint of the parameters).
    """
    tensors: dict[str, torch.Tensor] = {}
    entries = full = 0
    for name, p in model.named_parameters():
        if name not in base:
            continue
        cur, ref = p.detach().cpu(), base[name].detach().cpu()
        full += cur.numel() * cur.element_size()
        idx = torch.nonzero((cur != ref).reshape(-1), as_tuple=False).reshape(-1)
        if idx.numel() == 0:
            continue
        dtype = torch.int32 if cur.numel() < 2**31 else torch.int64
        tensors[f"{name}.indices"] = idx.to(dtype).contiguous()
        tensors[f"{name}.values"] = cur.reshape(-1)[idx].contiguous()
        entries += idx.numel()
    path = Path(path)
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "hf_continual.delta"}))
    return {"entries": entries, "delta_bytes": os.path.getsize(path), "full_bytes": full}


@torch.no_grad()
def apply_task_delta(model: torch.nn.Module, path: str | os.PathLike) -> int:
    """Write the stored entries into ``model``'s parameters; returns the number of entries set."""
    tensors = load_file(path)
    params = dict(model.named_parameters())
    count = 0
    for key, idx in tensors.items():
        if not key.endswith(".indices"):
            continue
        name = key[: -len(".indices")]
        if name not in params:
            raise KeyError(f"{path}: delta for parameter {name!r}, which the model does not have")
        values = tensors[f"{name}.values"]
        flat = params[name].data.view(-1)
        if int(idx.max()) >= flat.numel():
            raise ValueError(f"{path}: index out of range for {name} ({int(idx.max())} >= {flat.numel()})")
        flat[idx.long()] = values.to(flat.dtype)
        count += idx.numel()
    return count
