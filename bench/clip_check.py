"""Does gradient clipping weaken the penalty? Dev streams (seed 0) of ``bench/forgetting.py``'s budget.

Until 2026-12-02 the penalty gradient was added before the Trainer clipped the gradient to ``max_grad_norm``
(default 1.0), so a large penalty gradient shrank every step by a distance-dependent factor. The search of the
forgetting bench (penalty clipped) found dev forgetting INCREASING with lambda (K-FAC: 1.12 / 1.87 / 2.50 points at
1e3 / 1e4 / 1e5, none: 0.50). The penalty is now added after clipping. This script runs, with the current code:
K-FAC at lambda 1e4 to 1e7 (task gradient clipped, penalty not), and K-FAC 1e5 and plain fine-tuning without any
clipping (``max_grad_norm=0``). It writes ``OUT/runs/dev/<name>/seed0/results.json`` (cached like the forgetting
bench) and ``OUT/summary.md``.

Usage: ``HF_HUB_OFFLINE=1 python bench/clip_check.py [--data-dir ../shared/data] [--out bench/results/clip_check]``
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RUNS = {
    "kfac1e5_penalty_after_clip": {"continual_method": "kfac", "continual_lambda": 1e5},
    "kfac1e4_penalty_after_clip": {"continual_method": "kfac", "continual_lambda": 1e4},
    "kfac1e6_penalty_after_clip": {"continual_method": "kfac", "continual_lambda": 1e6},
    "kfac1e7_penalty_after_clip": {"continual_method": "kfac", "continual_lambda": 1e7},
    "kfac1e5_noclip": {"continual_method": "kfac", "continual_lambda": 1e5, "max_grad_norm": 0.0},
    "none_noclip": {"continual_method": "none", "max_grad_norm": 0.0},
}


TOY = [("none", 0.0), ("ewc", 1e4), ("ewc", 1e6), ("ewc", 1e8), ("kfac", 1e5), ("kfac", 1e7), ("kfac", 1e9)]


def toy_lines(out: Path) -> list[str]:
    """The same question on the synthetic toy stream (seconds per run): forgetting against lambda."""
    import shutil
    import tempfile

    from hf_continual.state import atomic_write_json
    from hf_continual.stream import run_stream
    from hf_continual.toy import tiny_bert, toy_config, toy_stream

    scratch = Path(tempfile.mkdtemp(prefix="clip_check-toy-"))
    rows = []
    for method, lam in TOY:
        kw = {} if method == "none" else {"continual_lambda": lam}
        args = toy_config(
            str(scratch / f"{method}-{lam:g}"),
            method,
            logging_strategy="no",
            fisher_batch_size=32,
            fisher_num_samples=256,
            **kw,
        )
        metrics = run_stream(tiny_bert(0), toy_stream(), args).metrics
        rows.append({"method": method, "lambda": lam, **metrics})
    shutil.rmtree(scratch, ignore_errors=True)
    atomic_write_json(out / "toy.json", rows)
    lines = ["", "Toy stream (hf_continual.toy, 3 tasks, tiny BERT, seed 0):", ""]
    lines += ["| method | lambda | ACC | forgetting |", "|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['lambda']:g} | {r['acc']:.3f} | {r['forgetting']:.3f} |" for r in rows]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/el_stream.yaml")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="bench/results/clip_check")
    ns = ap.parse_args()
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here.parent))
    sys.path.insert(0, str(here))
    from forgetting import Bench

    from hf_continual.recipe import load_recipe
    from hf_continual.state import atomic_write_text

    recipe = load_recipe(ns.recipe, overrides=[f"data_dir={ns.data_dir}"] if ns.data_dir else [])
    bench = Bench(recipe, Path(ns.out), show_progress=False)
    lines = [
        "Dev splits, seed 0, budget of recipes/el_stream.yaml; acc@1 x100.",
        "",
        "| run | settings | ACC | BWT | forgetting | task 1 after tasks 1 / 2 / 3 |",
        "|---|---|---|---|---|---|",
    ]
    for name, overrides in RUNS.items():
        r = bench.run("dev", name, 0, overrides)
        m, acc = r["metrics"], r["accuracy_matrix"]
        col = " / ".join(f"{100 * row[0]:.2f}" for row in acc)
        settings = ", ".join(f"{k}={v}" for k, v in overrides.items())
        lines.append(
            f"| {name} | {settings} | {100 * m['acc']:.2f} | {100 * m['bwt']:.2f} | "
            f"{100 * m['forgetting']:.2f} | {col} |"
        )
    lines += toy_lines(Path(ns.out))
    atomic_write_text(Path(ns.out) / "summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
