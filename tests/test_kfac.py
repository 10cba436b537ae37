"""K-FAC: factors, closed-form algebra, damping, cross-task modes, compact form, estimator integration."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hf_continual.curvature.base import curvature_penalty_grad_
from hf_continual.curvature.collectors.kfac import KFACCollector
from hf_continual.curvature.factors import DenseFactor, damping_shifts
from hf_continual.curvature.kfac import KFACFisher, KFACLayer, KronTerm, _low_rank_eig

# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


class TokenMLP(nn.Module):
    """Per-sequence classifier over token features ``x [B, T, d]``: Linear -> tanh -> Linear, masked mean pool."""

    def __init__(self, d: int = 5, h: int = 4, c: int = 3, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, h, bias=bias)
        self.fc2 = nn.Linear(h, c)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.fc2(torch.tanh(self.fc1(x)))  # [B, T, c]
        if attention_mask is None:
            return h.mean(1)
        m = attention_mask.to(h.dtype)[..., None]
        return (h * m).sum(1) / m.sum(1)


def run_collector(model: nn.Module, batches: list[dict], mode: str, mc: int = 1, **kw) -> KFACFisher:
    """Drive a KFACCollector by hand (empirical Fisher: backward of the summed CE)."""
    coll = KFACCollector(kfac_mode=mode, **kw)
    coll.attach(model)
    n = 0
    for batch in batches:
        x, y, am = batch["x"], batch["labels"], batch.get("attention_mask")
        coll.begin_batch(x.shape[0], 1, am)
        logits = model(x, attention_mask=am)
        for s in range(mc):
            loss = nn.functional.cross_entropy(logits, y, reduction="sum")
            torch.autograd.grad(loss, coll.grad_targets(), retain_graph=s < mc - 1, allow_unused=True)
            coll.after_backward()
        n += x.shape[0]
    coll.detach()
    return coll.finalize(coll.sums(), n, mc)


def random_delta(names_shapes: dict[str, torch.Size], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in names_shapes.items()}


def kron_block(f: KFACFisher, module: str) -> torch.Tensor:
    """Explicit ``sum_t scale_t (A_t + a I) (x) (G_t + b I)`` acting on column-major ``vec([W | b])``."""
    out = None
    for t in f.layer(module).terms:
        sa, sg = damping_shifts(t.A, t.G, f.damping)
        a = t.A.to_dense().double() + sa * torch.eye(t.A.dim, dtype=torch.float64)
        g = t.G.to_dense().double() + sg * torch.eye(t.G.dim, dtype=torch.float64)
        k = t.scale * torch.kron(a, g)
        out = k if out is None else out + k
    return out


def vec_bar(layer: KFACLayer, delta: dict[str, torch.Tensor]) -> torch.Tensor:
    x = delta[layer.weight]
    if layer.bias is not None:
        x = torch.cat([x, delta[layer.bias][:, None]], 1)
    return x.double().T.reshape(-1)  # column-major vec


def tiny_bert(num_labels: int = 3, seed: int = 0):
    from hf_continual.toy import tiny_bert as toy_bert

    return toy_bert(
        seed, hidden_size=16, num_attention_heads=2, intermediate_size=24, num_labels=num_labels
    ).eval()


def bert_dataset(n: int = 12, pad_to: int = 8, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 3 + i % 4
        ids = torch.zeros(pad_to, dtype=torch.long)
        ids[:length] = torch.randint(1, 40, (length,), generator=g)
        am = torch.zeros(pad_to, dtype=torch.long)
        am[:length] = 1
        out.append({"input_ids": ids, "attention_mask": am, "labels": torch.tensor(i % 3)})
    return out


# ----------------------------------------------------------------------------------------------------------
# (a) one Linear, one example, one token: K-FAC == exact Fisher block
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["expand", "reduce"])
def test_single_token_single_example_is_exact(mode: str) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    x, y = torch.randn(1, 4), torch.tensor([2])
    coll = KFACCollector(kfac_mode=mode, diagonal=False)
    coll.attach(lin)
    coll.begin_batch(1, 1, None)
    out = lin(x)
    torch.autograd.grad(nn.functional.cross_entropy(out, y, reduction="sum"), coll.grad_targets())
    coll.after_backward()
    coll.detach()
    f = coll.finalize(coll.sums(), 1, 1)
    # exact per-example gradient of [W | b]
    gw, gb = torch.autograd.grad(
        nn.functional.cross_entropy(lin(x), y, reduction="sum"), [lin.weight, lin.bias]
    )
    gvec = torch.cat([gw, gb[:, None]], 1).double().T.reshape(-1)
    exact = torch.outer(gvec, gvec)
    assert torch.allclose(kron_block(f, ""), exact, atol=1e-6)
    delta = {"weight": torch.randn(3, 4), "bias": torch.randn(3)}
    q_exact = float(vec_bar(f.layer(""), delta) @ exact @ vec_bar(f.layer(""), delta))
    assert math.isclose(float(f.quadratic(delta)), q_exact, rel_tol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# (b) quadratic / matvec == explicit kron(A, G); (d) damping formula
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["expand", "reduce"])
@pytest.mark.parametrize("gamma", [0.0, 0.3])
def test_quadratic_matvec_match_explicit_kron(mode: str, gamma: float) -> None:
    torch.manual_seed(1)
    model = TokenMLP()
    batches = [{"x": torch.randn(3, 4, 5), "labels": torch.randint(0, 3, (3,))} for _ in range(2)]
    f = run_collector(model, batches, mode, diagonal=False)
    f.damping = gamma
    shapes = {n: p.shape for n, p in model.named_parameters()}
    delta = random_delta(shapes, seed=3)
    q = 0.0
    mv = f.matvec(delta)
    for layer in f.layers:
        k = kron_block(f, layer.module)
        v = vec_bar(layer, delta)
        q += float(v @ k @ v)
        kv = (k @ v).reshape(-1, f.layer(layer.module).terms[0].G.dim).T  # back from column-major
        assert torch.allclose(
            mv[layer.weight].double(), kv[:, : shapes[layer.weight][1]], rtol=1e-4, atol=1e-6
        )
        assert torch.allclose(mv[layer.bias].double(), kv[:, -1], rtol=1e-4, atol=1e-6)
    assert math.isclose(float(f.quadratic(delta)), q, rel_tol=1e-5)


def test_damping_formula() -> None:
    torch.manual_seed(2)
    a = torch.randn(6, 5)
    g = torch.randn(7, 3)
    A, G = a.T @ a / 6, g.T @ g / 7
    gamma = 0.05
    pi = math.sqrt((float(A.trace()) / 5) / (float(G.trace()) / 3))
    sa, sg = damping_shifts(DenseFactor(A), DenseFactor(G), gamma)
    assert math.isclose(sa, pi * math.sqrt(gamma), rel_tol=1e-6)
    assert math.isclose(sg, math.sqrt(gamma) / pi, rel_tol=1e-6)
    f = KFACFisher([KFACLayer("m", "w", None, [KronTerm(DenseFactor(A), DenseFactor(G))])], damping=gamma)
    x = torch.randn(3, 5)
    expect = torch.trace((G + sg * torch.eye(3)) @ x @ (A + sa * torch.eye(5)) @ x.T)
    assert math.isclose(float(f.quadratic({"w": x})), float(expect), rel_tol=1e-5)
    assert damping_shifts(DenseFactor(A), DenseFactor(G), 0.0) == (0.0, 0.0)


# ----------------------------------------------------------------------------------------------------------
# (c) closed-form penalty gradient == autograd of lam/2 * quadratic
# ----------------------------------------------------------------------------------------------------------


def test_penalty_grad_matches_autograd() -> None:
    torch.manual_seed(3)
    model = TokenMLP()
    batches = [{"x": torch.randn(4, 3, 5), "labels": torch.randint(0, 3, (4,))}]
    f = run_collector(model, batches, "reduce", diagonal=False)
    f.damping = 0.01
    anchors = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    lam = 2.5
    # autograd reference: lam/2 * sum_l tr((G+bI) X (A+aI) X^T)
    ref = torch.zeros(())
    for layer in f.layers:
        t = layer.terms[0]
        sa, sg = damping_shifts(t.A, t.G, f.damping)
        params = dict(model.named_parameters())
        x = torch.cat(
            [
                params[layer.weight] - anchors[layer.weight],
                (params[layer.bias] - anchors[layer.bias])[:, None],
            ],
            1,
        )
        a = t.A.to_dense() + sa * torch.eye(t.A.dim)
        g = t.G.to_dense() + sg * torch.eye(t.G.dim)
        ref = ref + 0.5 * lam * torch.trace(g @ x @ a @ x.T)
    grads = torch.autograd.grad(ref, list(model.parameters()))
    for p in model.parameters():
        p.grad = torch.ones_like(p)  # existing gradient is added to
    value = curvature_penalty_grad_(f, model, anchors, lam)
    assert math.isclose(float(value), float(ref.detach()), rel_tol=1e-5)
    for p, g in zip(model.parameters(), grads):
        assert torch.allclose(p.grad - 1.0, g, rtol=1e-4, atol=1e-6)
    # method form, grad None -> set
    for p in model.parameters():
        p.grad = None
    v2 = f.add_penalty_grad_(dict(model.named_parameters()), anchors, lam)
    assert math.isclose(float(v2), float(ref.detach()), rel_tol=1e-5)
    assert all(torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6) for p, g in zip(model.parameters(), grads))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("gamma", [0.0, 0.05])
@pytest.mark.parametrize("residual", [True, False])
def test_eigen_form_penalty_fast_path_matches_generic_matvec(
    bias: bool, gamma: float, residual: bool
) -> None:
    """The eigen-form penalty (one addmm per term into .grad) equals the generic matvec path and autograd of
    lam/2 * quadratic, with several Kronecker terms (per-task, scaled), damping, and a bias-less layer."""
    torch.manual_seed(11)
    model = TokenMLP(d=8, h=7, c=6, bias=bias)
    b1 = [{"x": torch.randn(8, 3, 8), "labels": torch.randint(0, 6, (8,))}]
    b2 = [{"x": 2 * torch.randn(8, 3, 8) + 1, "labels": torch.randint(0, 6, (8,))}]
    f1 = run_collector(model, b1, "expand", diagonal=False, cross_task="per_task")
    f2 = run_collector(model, b2, "expand", diagonal=False, cross_task="per_task")
    f = f1.merge(f2, 0.6).compress(rank=1, energy=None, residual=residual)
    f.damping = gamma
    assert all(len(layer.terms) == 2 and _low_rank_eig(layer) for layer in f.layers)  # the fast path is taken
    anchors = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    lam = 1.7
    params = dict(model.named_parameters())
    ref = 0.5 * lam * f.quadratic({n: params[n] - anchors[n] for n in f.param_names})
    auto = torch.autograd.grad(ref, list(params.values()))
    ref = ref.detach()
    generic = {n: p.detach().clone() for n, p in params.items()}
    g_value = curvature_penalty_grad_(f, generic, anchors, lam)  # the generic path: one matvec
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    value = f.add_penalty_grad_(model, anchors, lam)
    assert math.isclose(value, float(ref), rel_tol=1e-5)
    assert math.isclose(value, float(g_value), rel_tol=1e-5)
    for (n, p), g in zip(params.items(), auto):
        assert torch.allclose(p.grad - 0.5, g, rtol=1e-4, atol=1e-6), n
        assert torch.allclose(generic[n].grad, g, rtol=1e-4, atol=1e-6), n
    # .grad None is created; a bf16 .grad is accumulated in fp32 then cast
    for p in model.parameters():
        p.grad = None
    f.add_penalty_grad_(model, anchors, lam)
    assert all(torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6) for p, g in zip(model.parameters(), auto))
    low = {
        n: p.detach().to(torch.bfloat16).requires_grad_() for n, p in params.items()
    }  # bf16 weights and .grad
    for p in low.values():
        p.grad = torch.zeros_like(p)
    f.add_penalty_grad_(low, anchors, lam)
    assert all(torch.allclose(p.grad.float(), g, rtol=5e-2, atol=5e-3) for p, g in zip(low.values(), auto))


# ----------------------------------------------------------------------------------------------------------
# (e) across tasks: per_task exact, merged approximate (exact for identical tasks)
# ----------------------------------------------------------------------------------------------------------


def _two_tasks(cross_task: str) -> tuple[KFACFisher, KFACFisher, dict]:
    torch.manual_seed(4)
    model = TokenMLP()
    b1 = [{"x": torch.randn(4, 3, 5), "labels": torch.randint(0, 3, (4,))}]
    b2 = [{"x": 2 * torch.randn(4, 3, 5) + 1, "labels": torch.randint(0, 3, (4,))}]
    f1 = run_collector(model, b1, "reduce", diagonal=False, cross_task=cross_task)
    f2 = run_collector(model, b2, "reduce", diagonal=False, cross_task=cross_task)
    return f1, f2, {n: p.shape for n, p in model.named_parameters()}


def test_merge_per_task_is_exact_sum() -> None:
    f1, f2, shapes = _two_tasks("per_task")
    decay = 0.7
    m = f1.merge(f2, decay)
    assert all(len(layer.terms) == 2 for layer in m.layers)
    m3 = m.merge(f2, decay)
    assert all(len(layer.terms) == 3 for layer in m3.layers)
    for seed in range(3):
        d = random_delta(shapes, seed)
        expect = decay * float(f1.quadratic(d)) + float(f2.quadratic(d))
        assert math.isclose(float(m.quadratic(d)), expect, rel_tol=1e-5)
        mv, mv1, mv2 = m.matvec(d), f1.matvec(d), f2.matvec(d)
        for n in mv:
            assert torch.allclose(mv[n], decay * mv1[n] + mv2[n], rtol=1e-5, atol=1e-7)
    # explicit sum of Kronecker products
    for layer in m.layers:
        k = kron_block(m, layer.module)
        expect = decay * kron_block(f1, layer.module) + kron_block(f2, layer.module)
        assert torch.allclose(k, expect, rtol=1e-6, atol=1e-9)


def test_merge_merged_semantics() -> None:
    f1, f2, shapes = _two_tasks("merged")
    decay = 0.5
    m = f1.merge(f2, decay)
    assert all(len(layer.terms) == 1 for layer in m.layers)
    for layer in m.layers:
        a1, g1 = f1.factors(layer.module)
        a2, g2 = f2.factors(layer.module)
        a, g = m.factors(layer.module)
        assert torch.allclose(g, decay * g1 + g2, atol=1e-7)
        assert torch.allclose(a, (decay * a1 + a2) / (decay + 1), atol=1e-7)
    assert m.task_weight == pytest.approx(1.5)
    # identical tasks: merged == exact sum
    same = f1.merge(f1, decay)
    d = random_delta(shapes, 9)
    assert math.isclose(float(same.quadratic(d)), (1 + decay) * float(f1.quadratic(d)), rel_tol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# (f) compact form and serialisation
# ----------------------------------------------------------------------------------------------------------


def _fisher_for_compress() -> tuple[KFACFisher, dict]:
    torch.manual_seed(5)
    model = TokenMLP(d=12, h=10, c=6)
    batches = [
        {"x": torch.randn(16, 3, 12) * torch.linspace(0.1, 2, 12), "labels": torch.randint(0, 6, (16,))}
    ]
    f = run_collector(model, batches, "expand", diagonal=False)
    return f, {n: p.shape for n, p in model.named_parameters()}


def test_compress_error_decreases_with_rank_and_full_rank_is_exact() -> None:
    f, shapes = _fisher_for_compress()
    errs = []
    for rank in (1, 3, 6):
        c = f.compress(rank=rank, energy=None)
        errs.append(c.compression_report["factor_rel_frob_mean"])
        assert c.factor_nbytes < f.factor_nbytes or rank == 6
    assert errs[0] > errs[1] > errs[2]
    full = f.compress(rank=None, energy=None, residual=False)
    assert full.compression_report["factor_rel_frob_max"] < 1e-5
    assert full.compression_report["quadratic_rel_err_max"] < 1e-5
    d = random_delta(shapes, 1)
    assert math.isclose(float(full.quadratic(d)), float(f.quadratic(d)), rel_tol=1e-5)
    mv, mvf = full.matvec(d), f.matvec(d)
    assert all(torch.allclose(mv[n], mvf[n], rtol=1e-4, atol=1e-6) for n in mv)
    # truncated: eigen-form quadratic agrees with its own matvec (<d, F d>) and with damping
    c = f.compress(rank=3, energy=None)
    c.damping = 0.1
    q = float(c.quadratic(d))
    mv = c.matvec(d)
    assert math.isclose(q, sum(float((mv[n] * d[n]).sum()) for n in mv), rel_tol=1e-5)
    # the residual keeps the trace
    for layer, cl in zip(f.layers, c.layers):
        assert math.isclose(cl.terms[0].A.trace(), layer.terms[0].A.trace(), rel_tol=1e-5)


def _assert_same(f1: KFACFisher, f2: KFACFisher, shapes: dict) -> None:
    d = random_delta(shapes, 2)
    assert math.isclose(float(f1.quadratic(d)), float(f2.quadratic(d)), rel_tol=1e-6)
    m1, m2 = f1.matvec(d), f2.matvec(d)
    assert m1.keys() == m2.keys() and all(torch.equal(m1[n], m2[n]) for n in m1)
    assert f1.param_names == f2.param_names and f1.nbytes == f2.nbytes


def test_state_dict_roundtrip_every_form(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    f, shapes = _fisher_for_compress()
    f.damping = 0.01
    forms = {
        "dense": f,
        "eig": f.compress(rank=4),
        "eig_bf16": f.compress(energy=0.99, dtype=torch.bfloat16),
        "per_task": KFACFisher(f.layers, cross_task="per_task").merge(f.compress(rank=2), 0.9),
    }
    for name, fi in forms.items():
        sd = fi.state_dict()
        assert fi.nbytes == sum(t.numel() * t.element_size() for t in sd.values())
        path = tmp_path / f"{name}.safetensors"
        save_file(sd, str(path))  # contiguous, no shared storage
        back = KFACFisher.from_state_dict(load_file(str(path)))
        _assert_same(fi, back, shapes)
        assert back.cross_task == fi.cross_task and back.damping == fi.damping


def test_nbytes_counts_factor_storage() -> None:
    f, _ = _fisher_for_compress()
    expect = sum(t.A.dim**2 * 4 + t.G.dim**2 * 4 for layer in f.layers for t in layer.terms)
    assert f.factor_nbytes == expect
    c = f.compress(rank=2, energy=None, dtype=torch.bfloat16)
    expect_c = sum(
        (t.A.dim * 2 + t.G.dim * 2) * 2 + (2 + 2) * 4 + 2 * 4 for layer in c.layers for t in layer.terms
    )
    assert c.factor_nbytes == expect_c


# ----------------------------------------------------------------------------------------------------------
# (g) padding; MC samples; rows of multi-row examples
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["expand", "reduce"])
def test_padding_does_not_change_factors(mode: str) -> None:
    from hf_continual.curvature import estimate_fisher

    model = tiny_bert()
    short = bert_dataset(pad_to=7)
    long = [
        {
            **ex,
            "input_ids": torch.cat([ex["input_ids"], torch.zeros(5, dtype=torch.long)]),
            "attention_mask": torch.cat([ex["attention_mask"], torch.zeros(5, dtype=torch.long)]),
        }
        for ex in short
    ]
    kw = dict(kind="kfac", fisher_type="empirical", batch_size=4, show_progress=False, kfac_mode=mode)
    f1 = estimate_fisher(model, short, **kw)
    f2 = estimate_fisher(model, long, **kw)
    for l1 in f1.layers:
        a1, g1 = f1.factors(l1.module)
        a2, g2 = f2.factors(l1.module)
        assert torch.allclose(a1, a2, rtol=1e-4, atol=1e-5), l1.module
        assert torch.allclose(g1, g2, rtol=1e-4, atol=1e-7), l1.module


def test_mc_samples_share_a() -> None:
    torch.manual_seed(6)
    model = TokenMLP()
    batches = [{"x": torch.randn(3, 4, 5), "labels": torch.randint(0, 3, (3,))}]
    f1 = run_collector(model, batches, "expand", mc=1, diagonal=False)
    f3 = run_collector(model, batches, "expand", mc=3, diagonal=False)  # same labels 3x: same G
    for layer in f1.layers:
        a1, g1 = f1.factors(layer.module)
        a3, g3 = f3.factors(layer.module)
        assert torch.allclose(a1, a3) and torch.allclose(g1, g3, rtol=1e-5)


def test_multirow_examples_reduce() -> None:
    """r rows per example (dual encoder): reduce averages a over all tokens of all rows of the example."""
    torch.manual_seed(7)
    lin = nn.Linear(3, 2)
    b, r, t = 2, 3, 4
    x = torch.randn(b * r, t, 3)
    mask = (torch.rand(b * r, t) > 0.3).long()
    mask[:, 0] = 1
    coll = KFACCollector(kfac_mode="reduce", diagonal=False)
    coll.attach(lin)
    coll.begin_batch(b, r, mask)
    out = lin(x)  # [b*r, t, 2]
    w = torch.randn(2)
    loss = ((out * mask[..., None]).sum(1) @ w).sum()  # per-row sums: loss_n = sum over its rows
    torch.autograd.grad(loss, coll.grad_targets())
    coll.after_backward()
    coll.detach()
    f = coll.finalize(coll.sums(), b, 1)
    a, g = f.factors("")
    xm = x.reshape(b, r * t, 3)
    mm = mask.reshape(b, r * t, 1).float()
    abar = torch.cat([(xm * mm).sum(1) / mm.sum(1), torch.ones(b, 1)], 1)
    assert torch.allclose(a, abar.T @ abar / b, atol=1e-6)
    gn = mm.sum(1) * w  # sum over the example's real tokens of d loss / d out = w
    assert torch.allclose(g, gn.T @ gn / b, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# (h) the estimator: coverage and 1 vs 2 processes
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["expand", "reduce"])
def test_estimate_fisher_kfac_covers_every_parameter(mode: str) -> None:
    from hf_continual.curvature import DiagonalFisher, estimate_fisher

    model = tiny_bert()
    f = estimate_fisher(
        model, bert_dataset(), kind="kfac", kfac_mode=mode, batch_size=4, show_progress=False, seed=0
    )
    assert isinstance(f, KFACFisher) and f.mode == mode
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(f.param_names) == sorted(trainable)
    linear = {n + ".weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {layer.weight for layer in f.layers} == linear
    assert isinstance(f.diagonal, DiagonalFisher)
    assert not set(f.diagonal.param_names) & linear
    assert all(p.grad is None for p in model.parameters())
    # include filter: only attention Linear layers by factors, the rest diagonal
    g = estimate_fisher(
        model,
        bert_dataset(),
        kind="kfac",
        kfac_mode=mode,
        include=r"attention",
        batch_size=4,
        show_progress=False,
    )
    assert all("attention" in layer.module for layer in g.layers)
    assert sorted(g.param_names) == sorted(trainable)


def test_reduce_key_projection_blind_spot_and_default_override() -> None:
    """Under pure reduce the token-summed gradient of an attention key projection vanishes (softmax rows sum to
    zero), so its G is ~0; the default layer_modes give key layers the expand convention."""
    from hf_continual.curvature import estimate_fisher

    model = tiny_bert()
    kw = dict(kind="kfac", kfac_mode="reduce", fisher_type="empirical", batch_size=4, show_progress=False)
    pure = estimate_fisher(model, bert_dataset(), layer_modes={}, **kw)
    default = estimate_fisher(model, bert_dataset(), **kw)
    key = "bert.encoder.layer.0.attention.self.key"
    _, g_pure = pure.factors(key)
    _, g_def = default.factors(key)
    assert float(g_def.trace()) > 0
    assert float(g_pure.trace()) < 1e-4 * float(g_def.trace())


def test_distributed_two_processes_match_one(tmp_path, group_dist_runs, script) -> None:
    from hf_continual.curvature import estimate_fisher

    mod = script("tests/dist/kfac_dist.py")
    build_dataset, build_model = mod.build_dataset, mod.build_model

    model = build_model()
    for mode in ("expand", "reduce"):
        f = estimate_fisher(model, build_dataset(), kfac_mode=mode, **mod.KWARGS)
        torch.save(f.state_dict(), tmp_path / f"single_{mode}.pt")
    for mode in ("expand", "reduce"):
        one = KFACFisher.from_state_dict(torch.load(tmp_path / f"single_{mode}.pt"))
        for rank in (0, 1):
            two = KFACFisher.from_state_dict(
                torch.load(group_dist_runs / "kfac_dist" / f"dist_{mode}_rank{rank}.pt")
            )
            for layer in one.layers:
                a1, g1 = one.factors(layer.module)
                a2, g2 = two.factors(layer.module)
                assert torch.allclose(a1, a2, rtol=1e-5, atol=1e-7), layer.module
                assert torch.allclose(g1, g2, rtol=1e-5, atol=1e-9), layer.module
            for n in one.diagonal.param_names:
                assert torch.allclose(one.diagonal[n], two.diagonal[n], rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("pending_rows", [5, 10_000])
def test_reduce_rows_deferred_into_stacked_products(monkeypatch, pending_rows: int) -> None:
    """Reduce-mode rows are buffered across batches and multiplied out in one product (flushed when PENDING_ROWS
    rows wait, and the rest at sums()/detach()): every factor equals the product-per-batch one, and fc1's A equals
    the hand formula mean_n a_bar_n a_bar_n^T (a_n = masked token mean of example n, bias column appended)."""
    import hf_continual.curvature.collectors.kfac as kfac_mod

    torch.manual_seed(7)
    model = TokenMLP()
    batches = [
        {"x": torch.randn(3, 4, 5), "labels": torch.randint(0, 3, (3,)), "attention_mask": torch.ones(3, 4)}
        for _ in range(5)  # 15 rows: flushed at 6 and 12, three left for sums()
    ]
    for b in batches:
        b["attention_mask"][0, 2:] = 0
    monkeypatch.setattr(kfac_mod, "PENDING_ROWS", 1)
    ref = run_collector(model, batches, "reduce", diagonal=False)
    monkeypatch.setattr(kfac_mod, "PENDING_ROWS", pending_rows)
    got = run_collector(model, batches, "reduce", diagonal=False)
    for layer in ref.layers:
        for r, g in zip(ref.factors(layer.module), got.factors(layer.module)):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
    # hand formula for fc1's A: token-mean inputs with the bias column
    rows = []
    for b in batches:
        m = b["attention_mask"][..., None]
        a = (b["x"] * m).sum(1) / m.sum(1)
        rows.append(torch.cat([a, torch.ones(a.shape[0], 1)], 1))
    a_all = torch.cat(rows)
    torch.testing.assert_close(got.factors("fc1")[0], a_all.T @ a_all / a_all.shape[0], rtol=1e-5, atol=1e-6)
