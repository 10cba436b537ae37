"""Command line: ``hf-continual demo``, ``hf-continual run RECIPE.yaml`` ... (see ``hf-continual --help``)."""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _demo(ns: argparse.Namespace) -> int:
    from .config import ContinualConfig
    from .stream import run_stream, summary_text
    from .toy import tiny_bert, toy_stream

    for method in ("none", "replay"):
        args = ContinualConfig(
            output_dir=os.path.join(ns.output_dir, method),
            continual_method=method,
            use_cpu=True,
            report_to="none",
            num_train_epochs=8,
            per_device_train_batch_size=32,
            learning_rate=2e-3,
            save_strategy="no",
            logging_strategy="no",
            seed=0,
        )
        result = run_stream(tiny_bert(0), toy_stream(), args)
        print(summary_text(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-continual", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the demo stream and print the accuracy matrix and metrics")
    demo.add_argument("--data-dir", default="../shared/data", help="directory with the corpora (see README)")
    demo.add_argument("--output-dir", default="outputs/demo", help="where results.json, plots and cards go")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
