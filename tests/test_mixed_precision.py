"""bf16: Fisher sums and K-FAC factors stay fp32 whatever the model's or autocast's dtype."""

import pytest
import torch

from hf_continual import ContinualConfig, ContinualTrainer
from hf_continual.curvature import estimate_fisher
from hf_continual.toy import tiny_bert, toy_stream


def _examples():
    return toy_stream(n_train=32, n_eval=8)[0].train_dataset


def _cosine(a: dict, b: dict) -> float:
    x = torch.cat([a[n].reshape(-1).double() for n in sorted(a)])
    y = torch.cat([b[n].reshape(-1).double() for n in sorted(a)])
    return float(x @ y / (x.norm() * y.norm()))


def test_bf16_model_gives_fp32_diagonal_close_to_fp32():
    ref = estimate_fisher(
        tiny_bert(0), _examples(), fisher_type="empirical", batch_size=8, show_progress=False
    )
    low = estimate_fisher(
        tiny_bert(0).to(torch.bfloat16),
        _examples(),
        fisher_type="empirical",
        batch_size=8,
        show_progress=False,
    )
    diag = low.diagonal()
    assert all(t.dtype == torch.float32 for t in diag.values())
    assert all(bool(torch.isfinite(t).all()) for t in diag.values())
    assert _cosine(diag, ref.diagonal()) > 0.99


def test_bf16_autocast_gives_fp32_kfac_factors():
    model = tiny_bert(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f = estimate_fisher(
            model, _examples(), kind="kfac", fisher_type="empirical", batch_size=8, show_progress=False
        )
    state = f.state_dict()
    floats = {k: v for k, v in state.items() if v.is_floating_point()}
    assert floats and all(v.dtype == torch.float32 for v in floats.values()), {
        k: v.dtype for k, v in floats.items() if v.dtype != torch.float32
    }
    ref = estimate_fisher(
        model, _examples(), kind="kfac", fisher_type="empirical", batch_size=8, show_progress=False
    )
    ref_floats = {k: v for k, v in ref.state_dict().items() if v.is_floating_point()}
    assert _cosine(floats, ref_floats) > 0.99


@pytest.mark.parametrize("method", ["ewc", "kfac"])
def test_bf16_model_gets_fp32_anchors_and_curvature(tmp_path, method):
    """A model whose weights are bf16 (not only autocast): the consolidated anchors and curvature are fp32, and
    the next task trains with the penalty (bf16 gradients, fp32 state).

    Checked by breaking the code on purpose: with anchors cloned in the parameters' dtype this test fails.
    """
    tasks = toy_stream(n_train=32, n_eval=8)
    model = tiny_bert(0).to(torch.bfloat16)
    args = ContinualConfig(
        output_dir=str(tmp_path),
        continual_method=method,
        continual_lambda=1e3,
        use_cpu=True,
        report_to="none",
        num_train_epochs=1,
        per_device_train_batch_size=16,
        learning_rate=1e-2,
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=1,
        disable_tqdm=True,
        fisher_num_samples=16,
        fisher_batch_size=8,
    )
    trainer = ContinualTrainer(model=model, args=args, train_dataset=tasks[0].train_dataset)
    trainer.train()
    trainer.end_task(task_name=tasks[0].name)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    anchor, curvature = trainer.method.terms[0]
    assert anchor and all(t.dtype == torch.float32 for t in anchor.values())
    floats = {k: v for k, v in curvature.state_dict().items() if v.is_floating_point()}
    assert floats and all(v.dtype == torch.float32 for v in floats.values())
    trainer.train_dataset = tasks[1].train_dataset
    trainer.train()
    logged = [h["continual_penalty"] for h in trainer.state.log_history if "continual_penalty" in h]
    assert len(logged) == 2 and logged[-1] > 0
    assert all(p.dtype == torch.bfloat16 and bool(torch.isfinite(p).all()) for p in model.parameters())


def test_kfac_bf16_outer_products_keep_fp32_factors_close_to_fp32():
    model = tiny_bert(0)
    kw = {"kind": "kfac", "fisher_type": "empirical", "batch_size": 8, "show_progress": False}
    ref = estimate_fisher(model, _examples(), **kw)
    low = estimate_fisher(model, _examples(), compute_dtype=torch.bfloat16, **kw)
    a = {k: v for k, v in low.state_dict().items() if v.is_floating_point()}
    b = {k: v for k, v in ref.state_dict().items() if v.is_floating_point()}
    assert all(v.dtype == torch.float32 for v in a.values())
    assert _cosine(a, b) > 0.999
