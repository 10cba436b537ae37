"""acc@1/acc@5 of the untouched packaged all-MiniLM-L6-v2 and of char-3-gram TF-IDF on each task's full test split.

Usage: ``HF_HUB_OFFLINE=1 python bench/untouched_el.py [--data-dir ../shared/data] [--candidates default|full]``;
writes ``bench/results/untouched_el.json``.
"""

from __future__ import annotations

import argparse
import json
import time

from hf_continual.recipe import packaged_model_path
from hf_continual.state import atomic_write_json
from hf_continual.tasks.entity_linking import TASK_REGISTRY, DualEncoderModel, build_entity_linking_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--candidates", default="default", choices=["default", "full"])
    ap.add_argument("--expand-abbreviations", action="store_true")
    ap.add_argument("--out", default="bench/results/untouched_el.json")
    ns = ap.parse_args()
    model = DualEncoderModel.from_base(packaged_model_path())
    model.eval()
    out = {}
    for name in TASK_REGISTRY:
        t0 = time.perf_counter()
        task = build_entity_linking_task(
            name,
            ns.data_dir,
            model.get_tokenizer(),
            split="test",
            max_train_mentions=8,
            eval_candidates=ns.candidates,
            expand_abbreviations=ns.expand_abbreviations,
        )
        minilm = task.evaluate(model)
        tfidf = task.evaluate_tfidf()
        out[name] = {
            "minilm": minilm,
            "tfidf": tfidf,
            "candidate_set": task.stats["candidate_set"],
            "test": task.stats["test"],
            "seconds": time.perf_counter() - t0,
        }
        print(
            f"{name:16s} MiniLM acc@1 {100 * minilm['acc@1']:.1f} acc@5 {100 * minilm['acc@5']:.1f} | TF-IDF acc@1 "
            f"{100 * tfidf['acc@1']:.1f} acc@5 {100 * tfidf['acc@5']:.1f} | {task.stats['candidate_set']}",
            flush=True,
        )
    atomic_write_json(
        ns.out, {"candidates": ns.candidates, "expand_abbreviations": ns.expand_abbreviations, "tasks": out}
    )
    print(json.dumps({k: round(v["minilm"]["acc@1"], 4) for k, v in out.items()}))


if __name__ == "__main__":
    main()
