"""Exact per-example diagonal Fisher vs a batch-size-1 autograd reference, DiagonalFisher algebra, penalty helper."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification, BertModel

import hf_continual.curvature.estimate as est
from hf_continual.curvature import (
    DiagonalFisher,
    add_penalty_grad_,
    estimate_fisher,
)
from hf_continual.toy import tiny_bert_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


def tiny_config(**kw) -> BertConfig:
    cfg = dict(
        vocab_size=99,
        hidden_size=24,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        hidden_dropout_prob=0.3,  # dropout on: estimation must switch it off
        attention_probs_dropout_prob=0.3,
    )
    cfg.update(kw)
    return tiny_bert_config(**cfg)


# ------------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------------


def pad_collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Pad 1-D (or [rows, T]) sequences to the batch's longest; labels lists padded with -100."""
    seq_keys = ("input_ids", "attention_mask", "token_type_ids")
    longest = max(len(row) for ex in examples for row in _rows(ex["input_ids"]))
    out: dict[str, torch.Tensor] = {}
    for k in examples[0]:
        if k in seq_keys:
            out[k] = torch.stack(
                [torch.tensor([r + [0] * (longest - len(r)) for r in _rows(ex[k])]) for ex in examples]
            )
            if not isinstance(examples[0][k][0], list):
                out[k] = out[k].squeeze(1)
        elif k == "labels" and isinstance(examples[0][k], list):
            out[k] = torch.tensor([ex[k] + [-100] * (longest - len(ex[k])) for ex in examples])
        elif k == "labels":
            out[k] = torch.tensor([ex[k] for ex in examples])
    return out


def _rows(x: list) -> list[list[int]]:
    return x if x and isinstance(x[0], list) else [x]


def seq_examples(
    n: int, num_labels: int, gen: torch.Generator, token_labels: bool = False, types: bool = True
):
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 12, (1,), generator=gen))
        ids = [2] + torch.randint(3, 99, (length - 1,), generator=gen).tolist()
        ex = {"input_ids": ids, "attention_mask": [1] * length, "text": "ignored string column"}
        if types:
            cut = int(torch.randint(1, length, (1,), generator=gen))
            ex["token_type_ids"] = [0] * cut + [1] * (length - cut)
        if token_labels:
            lab = torch.randint(0, num_labels, (length,), generator=gen)
            lab[torch.rand(length, generator=gen) < 0.3] = -100
            lab[0] = -100
            lab[1] = 0  # at least one valid position
            ex["labels"] = lab.tolist()
        else:
            ex["labels"] = int(torch.randint(0, num_labels, (1,), generator=gen))
        out.append(ex)
    return out


class ToyDualEncoder(nn.Module):
    """Mention + K candidates encoded by one BertModel as B*(1+K) contiguous rows; mean pooling; cosine*scale."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.encoder = BertModel(config)  # pooler kept on purpose: unused by the loss -> zero Fisher
        self.logit_scale = nn.Parameter(torch.tensor(3.0))  # no hook rule: exercises the exact fallback loop

    def rows_per_example(self, inputs: dict) -> int:
        return inputs["input_ids"].shape[1]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        b, rows, t = input_ids.shape
        h = self.encoder(
            input_ids=input_ids.reshape(b * rows, t), attention_mask=attention_mask.reshape(b * rows, t)
        )
        m = attention_mask.reshape(b * rows, t, 1).float()
        pooled = (h.last_hidden_state * m).sum(1) / m.sum(1)
        pooled = nn.functional.normalize(pooled, dim=-1).reshape(b, rows, -1)
        logits = self.logit_scale * torch.einsum("bd,bkd->bk", pooled[:, 0], pooled[:, 1:])
        return {"logits": logits}


def dual_examples(n: int, k: int, gen: torch.Generator):
    out = []
    for _ in range(n):
        rows = []
        for _ in range(1 + k):
            length = int(torch.randint(2, 9, (1,), generator=gen))
            rows.append([2] + torch.randint(3, 99, (length - 1,), generator=gen).tolist())
        out.append(
            {
                "input_ids": rows,
                "attention_mask": [[1] * len(r) for r in rows],
                "labels": int(torch.randint(0, k, (1,), generator=gen)),
            }
        )
    return out


# ------------------------------------------------------------------------------------------------------------
# reference: batch-size-1 autograd loop
# ------------------------------------------------------------------------------------------------------------


def reference_fisher(model, examples, draws_per_example=None) -> dict[str, torch.Tensor]:
    """(1/N) sum_n mean_s (grad of example n's loss alone)^2; labels from ``draws_per_example`` or gold."""
    model = copy.deepcopy(model).eval()  # leave the caller's model (modes, grads) alone
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    for i, ex in enumerate(examples):
        batch = pad_collate([ex])
        gold = batch.pop("labels")
        logits = model(**batch)["logits"]
        draws = [gold] if draws_per_example is None else [d.reshape(gold.shape) for d in draws_per_example[i]]
        for y in draws:
            y = y[..., : logits.shape[1]] if logits.dim() == 3 else y
            valid = gold != -100
            logp = torch.log_softmax(logits, -1).gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            loss = -(logp * valid).sum()
            grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
            for n, g in zip(params, grads):
                if g is not None:
                    acc[n] += g.square() / len(draws)
    return {n: a / len(examples) for n, a in acc.items()}


class DrawRecorder:
    """Wraps the estimator's label sampler and records each draw per example (in order)."""

    def __init__(self, mc: int) -> None:
        self.mc = mc
        self.batches: list[torch.Tensor] = []
        self.orig = est._sample_labels

    def __call__(self, logits, seed, indices, draw):
        y = self.orig(logits, seed, indices, draw)
        self.batches.append(y.clone())
        return y

    def per_example(self, examples) -> list[list[torch.Tensor]]:
        out = []
        for j in range(0, len(self.batches), self.mc):
            group = self.batches[j : j + self.mc]
            for row in range(group[0].shape[0]):
                out.append([g[row : row + 1] for g in group])
        assert len(out) == len(examples)
        for i, ex in enumerate(examples):  # token-level: keep this example's own length
            if isinstance(ex["labels"], list):
                out[i] = [d[:, : len(ex["labels"])] for d in out[i]]
        return out


def assert_fisher_close(fisher: DiagonalFisher, ref: dict[str, torch.Tensor]) -> None:
    assert set(fisher.param_names) == set(ref), set(fisher.param_names) ^ set(ref)
    scale = max(float(r.abs().max()) for r in ref.values())
    for n, r in ref.items():
        torch.testing.assert_close(fisher[n], r, rtol=1e-4, atol=1e-6 * scale, msg=lambda m, n=n: f"{n}: {m}")


def run(model, data, fisher_type, mc=1, **kw):
    """estimate_fisher and the matching reference (same sampled labels for the true Fisher)."""
    rec = DrawRecorder(mc)
    est._sample_labels, orig = rec, est._sample_labels
    try:
        fisher = estimate_fisher(
            model,
            data,
            fisher_type=fisher_type,
            mc_samples=mc,
            data_collator=pad_collate,
            show_progress=False,
            **kw,
        )
    finally:
        est._sample_labels = orig
    used = list(data)[: kw.get("num_samples") or len(data)]
    draws = None if fisher_type == "empirical" else rec.per_example(used)
    return fisher, reference_fisher(model, used, draws)


# ------------------------------------------------------------------------------------------------------------
# tests: exactness
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fisher_type,mc", [("empirical", 1), ("true", 2)])
def test_sequence_classification_matches_reference(fisher_type, mc):
    from datasets import Dataset

    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config(num_labels=3))
    gen = torch.Generator().manual_seed(1)
    data = Dataset.from_list(seq_examples(11, 3, gen))  # has a string column the estimator must drop
    model.train()
    model.bert.encoder.layer[0].eval()  # mixed modes must come back as they were
    sentinel = {n: torch.randn_like(p) for n, p in model.named_parameters() if n.endswith("bias")}
    for n, p in model.named_parameters():
        p.grad = sentinel[n].clone() if n in sentinel else None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every parameter has a hook rule: no fallback warning
        fisher, ref = run(model, data, fisher_type, mc, batch_size=4, num_samples=9, seed=0)
    assert_fisher_close(fisher, ref)
    # all parameters covered, incl. position / token-type embeddings, LayerNorm, pooler, classifier
    for n in (
        "bert.embeddings.position_embeddings.weight",
        "bert.embeddings.token_type_embeddings.weight",
        "bert.embeddings.word_embeddings.weight",
        "bert.embeddings.LayerNorm.weight",
        "bert.pooler.dense.weight",
        "classifier.bias",
    ):
        assert fisher[n].abs().sum() > 0, n
    # .grad untouched, modes restored
    for n, p in model.named_parameters():
        if n in sentinel:
            assert torch.equal(p.grad, sentinel[n])
        else:
            assert p.grad is None
    assert model.training and model.classifier.training
    assert (
        not model.bert.encoder.layer[0].training and not model.bert.encoder.layer[0].attention.self.training
    )


def test_num_samples_cap_and_batch_independence():
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config(num_labels=3))
    data = seq_examples(10, 3, torch.Generator().manual_seed(2))
    kw = dict(fisher_type="empirical", data_collator=pad_collate, show_progress=False)
    f4 = estimate_fisher(model, data, num_samples=4, batch_size=3, **kw)
    f4b = estimate_fisher(model, data[:4], batch_size=4, **kw)
    fall = estimate_fisher(model, data, batch_size=4, **kw)
    for n in f4.param_names:
        torch.testing.assert_close(f4[n], f4b[n], rtol=1e-4, atol=1e-9)
    assert not torch.allclose(f4["classifier.weight"], fall["classifier.weight"])


@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
def test_token_classification_matches_reference(fisher_type):
    torch.manual_seed(0)
    model = BertForTokenClassification(tiny_config(num_labels=4))
    data = seq_examples(7, 4, torch.Generator().manual_seed(3), token_labels=True, types=False)
    fisher, ref = run(model, data, fisher_type, batch_size=4, seed=1)
    assert_fisher_close(fisher, ref)
    assert fisher["bert.embeddings.position_embeddings.weight"].abs().sum() > 0


def test_dual_encoder_multi_row_matches_reference():
    torch.manual_seed(0)
    model = ToyDualEncoder(tiny_config())
    data = dual_examples(5, 3, torch.Generator().manual_seed(4))
    with pytest.warns(UserWarning, match="logit_scale"):
        fisher, ref = run(model, data, "true", batch_size=3, seed=2)
    assert_fisher_close(fisher, ref)
    assert fisher["logit_scale"] > 0
    assert fisher["encoder.embeddings.position_embeddings.weight"].abs().sum() > 0
    assert fisher["encoder.pooler.dense.weight"].abs().sum() == 0  # unused by the loss


def test_frozen_params_are_not_covered():
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config(num_labels=3))
    model.bert.embeddings.requires_grad_(False)
    data = seq_examples(6, 3, torch.Generator().manual_seed(5))
    kw = dict(fisher_type="empirical", data_collator=pad_collate, show_progress=False, batch_size=4)
    full = estimate_fisher(model, data, **kw)
    assert not any(n.startswith("bert.embeddings") for n in full.param_names)


# ------------------------------------------------------------------------------------------------------------
# tests: representation and penalty helper
# ------------------------------------------------------------------------------------------------------------


def _rand_fisher(names_shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return DiagonalFisher({n: torch.rand(s, generator=g) for n, s in names_shapes.items()})


def test_diagonal_fisher_algebra_and_state_dict():
    shapes = {"a.weight": (3, 4), "a.bias": (3,), "b.weight": (5,)}
    f = _rand_fisher(shapes, 0)
    delta = {n: torch.randn(s) for n, s in shapes.items()}
    delta["not.covered"] = torch.randn(2)
    expect = sum((f[n] * delta[n] ** 2).sum() for n in shapes)
    torch.testing.assert_close(f.quadratic(delta), expect)
    d = delta["a.weight"].clone().requires_grad_(True)  # differentiable (a reference penalty uses it)
    f.quadratic({"a.weight": d}).backward()
    torch.testing.assert_close(d.grad, 2 * f["a.weight"] * d.detach())
    mv = f.matvec(delta)
    assert set(mv) == set(shapes)
    for n in shapes:
        torch.testing.assert_close(mv[n], f[n] * delta[n])
    other = DiagonalFisher({"a.bias": torch.ones(3), "c": torch.ones(2)})
    m = f.merge(other, decay=0.5)
    assert set(m.param_names) == set(shapes) | {"c"}
    torch.testing.assert_close(m["a.bias"], 0.5 * f["a.bias"] + 1)
    torch.testing.assert_close(m["a.weight"], 0.5 * f["a.weight"])
    torch.testing.assert_close(m["c"], torch.ones(2))
    torch.testing.assert_close(f.scale(2.0)["b.weight"], 2 * f["b.weight"])
    assert f.diagonal().keys() == f.fisher.keys()
    g = DiagonalFisher.from_state_dict(f.state_dict())
    assert g.kind == "diagonal" and g.param_names == f.param_names
    for n in shapes:
        assert torch.equal(g[n], f[n])
    assert f.nbytes == 4 * (12 + 3 + 5)
    h = DiagonalFisher({})
    h.load_state_dict(f.state_dict())
    assert torch.equal(h["a.weight"], f["a.weight"])
    with pytest.raises(TypeError):
        f.merge(object(), 1.0)  # type: ignore[arg-type]


def test_foreach_penalty_grad_matches_autograd():
    torch.manual_seed(0)
    shapes = {"w": (7, 5), "b": (7,), "e": (11, 3)}
    f = _rand_fisher(shapes, 1)
    lam = 0.37
    params = {n: nn.Parameter(torch.randn(s)) for n, s in shapes.items()}
    anchors = {n: p.detach() + 0.1 * torch.randn_like(p) for n, p in params.items()}
    base = {"w": torch.randn(7, 5), "b": None, "e": torch.randn(11, 3)}

    # reference through autograd
    ref_params = {n: nn.Parameter(p.detach().clone()) for n, p in params.items()}
    pen = sum(lam / 2 * (f[n] * (ref_params[n] - anchors[n]) ** 2).sum() for n in shapes)
    pen.backward()
    pen = pen.detach()
    # helper (list form), existing grads kept and added to
    for n, p in params.items():
        p.grad = None if base[n] is None else base[n].clone()
    names = list(shapes)
    value = add_penalty_grad_(
        [params[n] for n in names], [anchors[n] for n in names], [f[n] for n in names], lam
    )
    assert value == pytest.approx(float(pen), rel=1e-5)
    for n in names:
        expect = ref_params[n].grad + (0 if base[n] is None else base[n])
        torch.testing.assert_close(params[n].grad, expect)
    # method form on a module / mapping
    for p in params.values():
        p.grad = None
    value2 = f.add_penalty_grad_(params, anchors, lam)
    assert value2 == pytest.approx(float(pen), rel=1e-5)
    for n in names:
        torch.testing.assert_close(params[n].grad, ref_params[n].grad)


# ------------------------------------------------------------------------------------------------------------
# distributed: 2 CPU processes (gloo) == 1 process
# ------------------------------------------------------------------------------------------------------------


def test_distributed_two_ranks_equal_single_process(group_dist_runs, script):
    fisher_dist = script("tests/dist/fisher_dist.py")
    model, data = fisher_dist.build()
    single = estimate_fisher(model, data, **fisher_dist.KWARGS, distributed=False)
    ranks = [torch.load(group_dist_runs / "fisher_dist" / f"rank{r}.pt") for r in range(2)]
    for r in ranks:
        assert set(r["empirical"]) == set(single.param_names)
        for n in single.param_names:
            torch.testing.assert_close(r["empirical"][n], single[n], rtol=1e-5, atol=1e-10)
    for n in ranks[0][
        "true"
    ]:  # the true Fisher draws differ per rank, but every rank ends with the same result
        assert torch.equal(ranks[0]["true"][n], ranks[1]["true"][n])


@pytest.mark.parametrize("kind", ["diagonal", "kfac"])
def test_estimation_keeps_no_batch_alive(monkeypatch, kind):
    """Every captured layer output (and with it the batch's autograd graph) is freed once the estimate returns:
    a hook holding its record strongly made a C++ reference cycle that leaked ~70 MB per dual-encoder example."""
    import gc
    import weakref

    from hf_continual.curvature.collectors import hooks as _hooks
    from hf_continual.toy import tiny_bert, toy_stream

    outputs: list[weakref.ref] = []
    make_record = _hooks.Record

    def tracked_record(*args, **kwargs):
        rec = make_record(*args, **kwargs)
        outputs.append(weakref.ref(rec.output))
        return rec

    monkeypatch.setattr(_hooks, "Record", tracked_record)
    from hf_continual.curvature import estimate_fisher

    data = toy_stream(n_train=16, n_eval=4)[0].train_dataset
    estimate_fisher(tiny_bert(0), data, kind=kind, batch_size=4, show_progress=False)
    gc.collect()
    assert outputs and all(ref() is None for ref in outputs), sum(ref() is not None for ref in outputs)
