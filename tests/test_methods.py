"""EWC, online EWC and K-FAC EWC through the trainer: closed-form gradients, scaling, and less forgetting."""

import sys
from pathlib import Path

import pytest
import torch

from hf_continual import ContinualTrainer
from hf_continual.methods import trainable_parameters
from hf_continual.stream import run_stream
from hf_continual.toy import tiny_bert, toy_config, toy_stream

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from common import GLOBAL_BATCH, one_step_params  # noqa: E402


def _args(tmp_path, method, **kw):
    values = dict(logging_strategy="steps", logging_steps=4, fisher_batch_size=32, fisher_num_samples=256)
    values.update(kw)
    return toy_config(str(tmp_path / method), method, **values)


def _consolidated_trainer(tmp_path, method, **kw):
    tasks = toy_stream(n_train=64, n_eval=8)
    trainer = ContinualTrainer(
        model=tiny_bert(0),
        args=_args(tmp_path, method, num_train_epochs=1, **kw),
        train_dataset=tasks[0].train_dataset,
    )
    trainer.train()
    trainer.end_task(task_name="t0")
    with torch.no_grad():  # move away from the anchor so the penalty is not zero
        for p in trainer.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return trainer


@pytest.mark.parametrize(
    "method, kw",
    [
        ("ewc", {}),
        ("online_ewc", {}),
        ("kfac", {}),
        ("kfac", {"kfac_damping": 1e-3}),
        ("kfac", {"kfac_mode": "expand"}),
    ],
)
def test_closed_form_penalty_gradient_equals_autograd(tmp_path, method, kw):
    trainer = _consolidated_trainer(tmp_path, method, continual_lambda=7.0, **kw)
    model, m = trainer.model, trainer.method
    params = trainable_parameters(model)
    for p in params.values():
        p.grad = None
    value = m.apply_gradients(model)
    closed = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    for p in params.values():
        p.grad = None
    ref = m.penalty(model)
    ref.backward()
    assert value == pytest.approx(float(ref.detach()), rel=1e-4)
    assert set(closed) == {n for n, p in params.items() if p.grad is not None}
    for n, g in closed.items():
        torch.testing.assert_close(g, params[n].grad, rtol=1e-4, atol=1e-7, msg=lambda s, n=n: f"{n}: {s}")


def test_online_ewc_decays_and_per_task_ewc_keeps_terms(tmp_path):
    tasks = toy_stream(n_train=32, n_eval=8)
    fishers = {}
    for method, kw in [("online_ewc", {"online_ewc_gamma": 0.5}), ("ewc", {"ewc_mode": "per_task"})]:
        trainer = ContinualTrainer(
            model=tiny_bert(0),
            args=_args(tmp_path, method, num_train_epochs=1, **kw),
            train_dataset=tasks[0].train_dataset,
        )
        for t in tasks[:2]:
            trainer.train_dataset = t.train_dataset
            trainer.train()
            trainer.end_task(task_name=t.name)
        fishers[method] = trainer.method.terms
    assert len(fishers["online_ewc"]) == 1 and len(fishers["ewc"]) == 2
    # online: F = 0.5 * F_0 + F_1, where F_0, F_1 are the per-task Fishers of the per-task run (same training)
    f_online = fishers["online_ewc"][0][1].diagonal()
    f0, f1 = (term[1].diagonal() for term in fishers["ewc"])
    name = "classifier.weight"
    torch.testing.assert_close(f_online[name], 0.5 * f0[name] + f1[name], rtol=1e-4, atol=1e-10)


def _assert_penalty_changes_the_step(with_penalty, without_penalty, min_change=1e-3):
    """The penalty gradient of the step under test is far from zero: its share of the update is at least
    ``min_change`` in some parameter, 1000x the ``atol`` the equality checks below tolerate."""
    change = max(float((with_penalty[n] - without_penalty[n]).abs().max()) for n in with_penalty)
    assert change > min_change, change


@pytest.mark.parametrize("method", ["ewc", "kfac"])
def test_penalty_update_same_with_grad_accumulation(tmp_path, method):
    """One step from a point away from the anchor: GA=2 on half batches == GA=1 on the global batch.

    Checked by breaking the code on purpose: with the penalty gradient multiplied by
    ``gradient_accumulation_steps`` where the trainer adds it, this test fails for both methods.
    """
    full = one_step_params(str(tmp_path / "a"), GLOBAL_BATCH, 1, method=method, prior_task=True)
    accum = one_step_params(str(tmp_path / "b"), GLOBAL_BATCH // 2, 2, method=method, prior_task=True)
    bare = one_step_params(
        str(tmp_path / "c"), GLOBAL_BATCH, 1, method=method, prior_task=True, continual_lambda=0.0
    )
    _assert_penalty_changes_the_step(full, bare)
    for n in full:  # fp32 sums of 8 examples in another order: a few ulps
        torch.testing.assert_close(full[n], accum[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["ewc", "kfac"])
def test_penalty_update_same_with_two_processes(tmp_path, scaling_dist_runs, method):
    """One step from a point away from the anchor: 2 processes x 4 examples == 1 process x 8 examples.

    Checked by breaking the code on purpose: with the penalty gradient multiplied by the world size where the
    trainer adds it, this test fails (rank 0 vs the single process).
    """
    single = one_step_params(str(tmp_path / "a"), GLOBAL_BATCH, 1, method=method, prior_task=True)
    bare = one_step_params(
        str(tmp_path / "c"), GLOBAL_BATCH, 1, method=method, prior_task=True, continual_lambda=0.0
    )
    _assert_penalty_changes_the_step(single, bare)
    rank0, rank1 = scaling_dist_runs[f"{method}:prior"]
    for n in single:
        # bit-equal ranks: both apply the same all-reduced gradient (gloo hands every rank the same reduced
        # buffer) to the same parameters with the same code on the same CPU
        torch.testing.assert_close(rank0[n], rank1[n], rtol=0, atol=0)
        torch.testing.assert_close(single[n], rank0[n], rtol=1e-5, atol=1e-6)  # another summation order


def test_penalty_is_logged(tmp_path):
    """The logged ``continual_penalty`` of a step is the penalty at the parameters it started from (here > 0).

    With learning rate 0 the parameters stay where the step started, so the value can be checked against the
    differentiable reference ``method.penalty(model)``. Fails when the logged value is 0 or another step's.
    """
    _, trainer = one_step_params(
        str(tmp_path / "a"),
        4,
        1,
        method="ewc",
        prior_task=True,
        return_trainer=True,
        logging_strategy="steps",
        logging_steps=1,
        learning_rate=0.0,
    )
    logged = [h["continual_penalty"] for h in trainer.state.log_history if "continual_penalty" in h]
    expected = float(trainer.method.penalty(trainer.model).detach())
    assert len(logged) == 2 and expected > 1e-3
    for value in logged:  # logged values are rounded to 6 decimals
        assert value == pytest.approx(expected, abs=5e-7)


@pytest.fixture(scope="module")
def toy_forgetting(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("forget")
    out = {}
    # lambdas for the penalty added after gradient clipping (a clipped penalty needed ~100x less: the clip did part
    # of its work by shrinking the whole step)
    for method, kw in [("none", {}), ("ewc", {"continual_lambda": 1e6}), ("kfac", {"continual_lambda": 1e7})]:
        out[method] = run_stream(
            tiny_bert(0), toy_stream(), _args(tmp, method, logging_strategy="no", **kw)
        ).metrics
    return out


@pytest.mark.parametrize("method", ["ewc", "kfac"])
def test_penalties_forget_less_than_plain_finetuning(toy_forgetting, method):
    assert toy_forgetting["none"]["forgetting"] > 0.1
    assert toy_forgetting[method]["forgetting"] < toy_forgetting["none"]["forgetting"] - 0.05
