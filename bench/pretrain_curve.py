"""Learning curve of self-alignment pretraining: zero-shot dev acc@1/acc@5 vs synonym pairs seen.

Scores the untouched base model (0 pairs) and every ``snapshots/step-N`` of a ``hf-continual pretrain`` output
directory on each task's dev split (default candidate set, abbreviations expanded, no task training), the same
protocol as ``bench/untouched_el.py``. Points already in the results file are skipped, so it can be re-run (or
left following a running job with ``--follow PID``) and only new snapshots are scored.

Usage: ``HF_HUB_OFFLINE=1 python bench/pretrain_curve.py --run /work/runs/pretrain_full
[--tasks ncbi-disease bc5cdr-disease] [--follow PID]``; writes ``bench/results/pretrain/curve.json`` and
``curve.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from hf_continual.recipe import packaged_model_path
from hf_continual.state import atomic_write_json, atomic_write_text
from hf_continual.tasks.entity_linking import DualEncoderModel, build_entity_linking_task


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _snapshots(run: Path, steps: list[int] | None = None) -> list[tuple[str, Path, dict]]:
    """(label, directory, snapshot_info) of the finished snapshots, optionally only those of ``steps``."""
    out = []
    for d in sorted((run / "snapshots").glob("step-*")):
        info_file = d / "snapshot_info.json"
        if d.is_dir() and not d.name.endswith(".tmp") and info_file.is_file():
            info = json.loads(info_file.read_text())
            if steps is None or info["step"] in steps:
                out.append((d.name, d, info))
    return out


def _markdown(results: dict) -> str:
    tasks = results["tasks"]
    head = "| point | pairs seen | train s | " + " | ".join(f"{t} acc@1 | {t} acc@5" for t in tasks) + " |"
    rows = [head, "|" + "---|" * (3 + 2 * len(tasks))]
    for name, p in sorted(results["points"].items(), key=lambda kv: kv[1]["pairs_seen"]):
        cells = [name, str(p["pairs_seen"]), f"{p.get('train_seconds', 0):.0f}"]
        for t in tasks:
            s = p["scores"][t]
            cells += [f"{100 * s['acc@1']:.1f}", f"{100 * s['acc@5']:.1f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return (
        f"Zero-shot {results['split']} acc@k x100 (default candidate set, abbreviations expanded) of "
        f"`{results['run']}` snapshots; 0 pairs = the untouched base model.\n\n" + "\n".join(rows) + "\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="output directory of hf-continual pretrain")
    ap.add_argument("--tasks", nargs="+", default=["ncbi-disease", "bc5cdr-disease"])
    ap.add_argument("--split", default="dev", choices=["dev", "test"])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--base", default=None, help="base model path (default: the packaged MiniLM)")
    ap.add_argument("--out", default="bench/results/pretrain")
    ap.add_argument("--follow", type=int, default=None, help="keep scoring new snapshots while this pid runs")
    ap.add_argument("--poll", type=float, default=120.0, help="seconds between checks with --follow")
    ap.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=None,
        help="score only these snapshot steps (e.g. 722: the end of MEDIC in the full recipe); default all",
    )
    ns = ap.parse_args()
    run, out = Path(ns.run), Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    result_file = out / "curve.json"
    results = json.loads(result_file.read_text()) if result_file.is_file() else {}
    if results and (results.get("tasks") != ns.tasks or results.get("split") != ns.split):
        raise SystemExit(f"{result_file} holds other tasks/split; use another --out")
    results.update({"run": str(run), "tasks": ns.tasks, "split": ns.split})
    results.setdefault("points", {})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = ns.base or packaged_model_path()
    tokenizer = DualEncoderModel.from_base(base).get_tokenizer()
    tasks = {
        name: build_entity_linking_task(
            name,
            ns.data_dir,
            tokenizer,
            split=ns.split,
            max_train_mentions=8,
            eval_candidates="default",
            expand_abbreviations=True,
            show_progress=False,
        )
        for name in ns.tasks
    }
    results["candidate_sets"] = {n: t.stats["candidate_set"] for n, t in tasks.items()}

    def score(label: str, path: str, info: dict) -> None:
        t0 = time.perf_counter()
        model = DualEncoderModel.from_base(path).to(device).eval()
        scores = {n: t.evaluate(model) for n, t in tasks.items()}
        results["points"][label] = {
            **info,
            "path": path,
            "scores": scores,
            "eval_seconds": time.perf_counter() - t0,
        }
        atomic_write_json(result_file, results)
        atomic_write_text(out / "curve.md", _markdown(results))
        print(
            f"{label}: pairs {info['pairs_seen']} "
            + " ".join(f"{n} {100 * s['acc@1']:.1f}/{100 * s['acc@5']:.1f}" for n, s in scores.items()),
            flush=True,
        )

    if "base" not in results["points"]:
        score("base", base, {"step": 0, "pairs_seen": 0, "train_seconds": 0.0})
    while True:
        for label, path, info in _snapshots(run, ns.steps):
            if label not in results["points"]:
                score(label, str(path), info)
        if not _alive(ns.follow):
            break
        time.sleep(ns.poll)
    for label, path, info in _snapshots(run, ns.steps):  # the last snapshot(s) written before the job ended
        if label not in results["points"]:
            score(label, str(path), info)


if __name__ == "__main__":
    main()
