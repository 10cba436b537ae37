"""Cost, forgetting and entity-linking quality tables from the bench result files, as one markdown file.

Reads ``bench/results/{fisher,kfac,fish}.json`` (``bench_fisher.py``, ``bench_kfac.py``, ``bench_fish.py``) and
``bench/results/forgetting/summary.md`` (``forgetting.py``) and ``bench/results/el_quality/summary.md``
(``el_quality.py``; also every ``el_quality_*/`` and ``el_search/*/`` summary: other epochs, scales and the dev
searches); writes ``bench/results/tables.md``. A missing input
is named in the output instead of a number. ``make bench`` runs every bench and then this script, so the
README's tables can be copied from one file whose numbers all come from result files.

Usage: ``python bench/tables.py [--results bench/results]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hf_continual.state import atomic_write_text


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def cost_rows(results: Path) -> list[tuple[str, str, str, str]]:
    """(measurement, value, goal, source) rows of the cost table."""
    rows: list[tuple[str, str, str, str]] = []
    fisher = _load(results / "fisher.json")
    if fisher is None:
        rows.append(("Fisher estimation", "missing: run bench/bench_fisher.py", "", "fisher.json"))
    else:
        r = fisher["ratios"]
        rows += [
            (
                "diagonal Fisher, true (sampled labels) / plain fwd+bwd pass",
                f"{r['fisher_true/unit']:.2f}x",
                "<= 1.5x",
                "fisher.json",
            ),
            (
                "diagonal Fisher, empirical / plain pass",
                f"{r['fisher_empirical/unit']:.2f}x",
                "<= 1.5x",
                "fisher.json",
            ),
            ("batch-size-1 reference loop / plain pass", f"{r['bs1_loop/unit']:.2f}x", "", "fisher.json"),
            (
                "EWC penalty (foreach) / AdamW step",
                f"{r['penalty_foreach/adamw_step']:.2f}x",
                "<= 1.0x",
                "fisher.json",
            ),
        ]
    kfac = _load(results / "kfac.json")
    if kfac is None:
        rows.append(("K-FAC", "missing: run bench/bench_kfac.py", "", "kfac.json"))
    else:
        c = kfac["cost"]
        x = c["factor_pass_x"]
        rows += [
            ("K-FAC factor pass, expand / plain pass", f"{x['expand']:.2f}x", "<= 1.3x", "kfac.json"),
            ("K-FAC factor pass, reduce / plain pass", f"{x['reduce']:.2f}x", "<= 0.8x", "kfac.json"),
        ]
        if "floor_x" in c:
            rows.append(
                (
                    "K-FAC floor: forward with bare hooks + backward to the Linear outputs / plain pass",
                    f"{c['floor_x']:.2f}x",
                    "",
                    "kfac.json",
                )
            )
        for key, label in (
            ("reduce_key_expand", "reduce with the key layers in expand (default)"),
            ("expand_bf16", "expand, bf16 outer products"),
            ("reduce_bf16", "reduce, bf16 outer products"),
            ("reduce+diag", "reduce + diagonal of the other parameters (what `kfac` runs)"),
        ):
            if key in x:
                rows.append((f"K-FAC factor pass, {label} / plain pass", f"{x[key]:.2f}x", "", "kfac.json"))
        for base, err in c.get("bf16_factor_error", {}).items():
            rows.append(
                (
                    f"K-FAC bf16 products, {base}: factor rel. Frobenius error vs fp32 (mean; max)",
                    f"{err['rel_frob_mean']:.1e}; {err['rel_frob_max']:.1e}",
                    "",
                    "kfac.json",
                )
            )
        forms = c["forms"]
        dense, r64 = forms.get("dense_fp32"), forms.get("eig_r64")
        if dense:
            rows.append(
                (
                    "K-FAC penalty, dense fp32 factors / training step",
                    f"{dense['penalty_x_step']:.3f}",
                    "",
                    "kfac.json",
                )
            )
            rows.append(
                (
                    "K-FAC state, dense fp32 factors / model bytes",
                    f"{dense['factor_x_model']:.2f}x",
                    "",
                    "kfac.json",
                )
            )
        generic = forms.get("eig_r64_generic")
        if generic:
            rows.append(
                (
                    "K-FAC penalty, rank-64 eigen form through the generic matvec / training step",
                    f"{generic['penalty_x_step']:.3f}",
                    "",
                    "kfac.json",
                )
            )
        if r64:
            rows.append(
                (
                    "K-FAC penalty, rank-64 eigen form / training step",
                    f"{r64['penalty_x_step']:.3f}",
                    "<= 0.15",
                    "kfac.json",
                )
            )
            rows.append(
                (
                    "K-FAC state, rank-64 eigen form / model bytes (quadratic rel. error)",
                    f"{r64['factor_x_model']:.3f}x ({r64['quadratic_rel_err_mean']:.1e})",
                    "<= 1.0x",
                    "kfac.json",
                )
            )
    fish = _load(results / "fish.json")
    if fish is None:
        rows.append(("FISH", "missing: run bench/bench_fish.py", "", "fish.json"))
    else:
        r = fish["ratios"]
        rows += [
            (
                "FISH masked step / plain step (best; median)",
                f"{r['train_step_fish/train_step_plain']:.3f} ({r['train_step_fish/train_step_plain (median)']:.3f})",
                "<= 1.08",
                "fish.json",
            ),
            ("FISH mask computation / plain pass", f"{r['mask_compute/unit']:.2f}x", "", "fish.json"),
            (
                "FISH task delta / full checkpoint bytes (keep 0.5%)",
                f"{r['delta_bytes/checkpoint_bytes']:.4f}",
                "<= 0.02",
                "fish.json",
            ),
        ]
    return rows


def render(results: Path) -> str:
    lines = ["## Cost (packaged MiniLM, 256 examples x 32 tokens, 2 CPU threads)", ""]
    lines += ["| measurement | value | goal | file |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in cost_rows(results)]
    lines += ["", "## Forgetting on NCBI-disease -> BC5CDR-disease -> BC5CDR-chemical", ""]
    summary = results / "forgetting" / "summary.md"
    lines.append(summary.read_text().rstrip() if summary.is_file() else "missing: run bench/forgetting.py")
    clip = results / "clip_check" / "summary.md"
    if clip.is_file():
        lines += [
            "",
            "### Gradient clipping and the penalty (`bench/clip_check.py`)",
            "",
            clip.read_text().rstrip(),
        ]
    lines += ["", "## Entity-linking quality per task alone (ablation)", ""]
    quality = results / "el_quality" / "summary.md"
    lines.append(quality.read_text().rstrip() if quality.is_file() else "missing: run bench/el_quality.py")
    others = sorted(results.glob("el_quality_*/summary.md")) + sorted(results.glob("el_search/*/summary.md"))
    for other in others:  # other epochs, scales, dev searches (the first line of each states its settings)
        lines += ["", f"### `{other.parent.relative_to(results)}`", "", other.read_text().rstrip()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="bench/results")
    args = ap.parse_args()
    results = Path(args.results)
    text = render(results)
    out = results / "tables.md"
    atomic_write_text(out, text)
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
