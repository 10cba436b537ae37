"""The continual state on an accelerator: every method on CUDA, state moved between devices, bf16, DDP over NCCL.

The CUDA tests are skipped (and reported as skipped) on a machine without CUDA; ``make gpu-check`` runs them on
a GPU. The tests at the end run everywhere: they pin the placement rule on the CPU (a state loaded into a
model of another dtype follows the model) and the CPU path of ``make gpu-check``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_continual import ContinualConfig, ContinualTrainer
from hf_continual.stream import run_stream
from hf_continual.toy import tiny_bert, toy_config, toy_stream

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device (run `make gpu-check` on a GPU machine)")
METHODS = ["ewc", "online_ewc", "kfac", "fish", "replay", "joint", "none"]


def _args(tmp_path: Path, method: str, device: str, **kw) -> ContinualConfig:
    values = dict(
        use_cpu=device == "cpu",
        num_train_epochs=2,
        per_device_train_batch_size=16,
        fisher_batch_size=16,
        fisher_num_samples=64,
        fish_num_samples=32,
        fish_keep_ratio=0.05,
        continual_lambda=100.0,
    )
    values.update(kw)
    return toy_config(str(tmp_path / f"{method}-{device}"), method, **values)


def _train_task0(tmp_path: Path, method: str, device: str, model=None, **kw) -> ContinualTrainer:
    tasks = toy_stream(n_train=64, n_eval=16)
    model = tiny_bert(0) if model is None else model
    trainer = ContinualTrainer(
        model=model, args=_args(tmp_path, method, device, **kw), train_dataset=tasks[0].train_dataset
    )
    trainer.train()
    trainer.end_task(task_name="toy-a")
    return trainer


def assert_state_follows_model(method, model: torch.nn.Module) -> None:
    """Every tensor of the method's state is on the model's device; floating ones in at least fp32."""
    tensors, _ = method.state_dict()
    device = next(model.parameters()).device
    assert tensors, "no state to check"
    for name, t in tensors.items():
        assert t.device == device, f"{name} on {t.device}, model on {device}"
        if t.is_floating_point():
            assert t.dtype in (torch.float32, torch.float64), f"{name} is {t.dtype}"


def _penalty_at(trainer: ContinualTrainer, shift: dict[str, torch.Tensor]) -> torch.Tensor:
    """The penalty value after moving every parameter by ``shift`` (the same on every device)."""
    model = trainer.model
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(shift[n].to(p))
    return trainer.method.penalty(model).detach().double().cpu()


def _shift(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {n: 0.01 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}


# ---- on CUDA -------------------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_the_toy_stream_on_cuda(tmp_path, method):
    result = run_stream(tiny_bert(0), toy_stream(n_train=64, n_eval=32), _args(tmp_path, method, "cuda"))
    assert all(0.0 <= v <= 1.0 for row in result.accuracy_matrix for v in row)
    assert next(result.trainer.model.parameters()).is_cuda
    if method not in ("none", "replay", "joint"):
        assert_state_follows_model(result.trainer.method, result.trainer.model)


@needs_cuda
@pytest.mark.parametrize("method", ["ewc", "kfac", "fish"])
@pytest.mark.parametrize("source, target", [("cpu", "cuda"), ("cuda", "cpu")])
def test_state_saved_on_one_device_loads_on_the_other_with_equal_penalty(tmp_path, method, source, target):
    kw = {"fish_penalty": "ewc"} if method == "fish" else {}
    trained = _train_task0(tmp_path, method, source, **kw)
    trained.save_model(str(tmp_path / "saved"))
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(tmp_path / "saved").to(target)
    fresh = ContinualTrainer(model=model, args=_args(tmp_path, method, target, **kw))
    fresh.load_continual_state(tmp_path / "saved")
    assert_state_follows_model(fresh.method, fresh.model)
    shift = _shift(model)
    # fp32 on two devices: other kernels, other summation orders
    torch.testing.assert_close(_penalty_at(fresh, shift), _penalty_at(trained, shift), rtol=1e-4, atol=1e-8)


@needs_cuda
def test_kfac_rank_compress_on_cuda(tmp_path):
    trainer = _train_task0(tmp_path, "kfac", "cuda")
    kfac = trainer.method.terms[0][1]
    compact = kfac.compress(rank=4)
    assert compact.compression_report
    for name, t in compact.state_dict().items():
        assert t.is_cuda, name
    d = {n: 0.01 * torch.randn_like(p) for n, p in trainer.model.named_parameters() if n in kfac.param_names}
    assert float(compact.quadratic(d)) > 0


@needs_cuda
def test_fish_masks_live_on_cuda_and_only_masked_entries_change(tmp_path):
    tasks = toy_stream(n_train=64, n_eval=16)
    model = tiny_bert(0).cuda()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = ContinualTrainer(
        model=model, args=_args(tmp_path, "fish", "cuda"), train_dataset=tasks[0].train_dataset
    )
    trainer.train()
    masks = trainer.method.masks
    assert masks and all(m.is_cuda for m in masks.values())
    changed = 0
    for n, p in model.named_parameters():
        diff = p.detach() != start[n]
        assert not bool(diff[~masks[n]].any()), f"{n}: a frozen entry moved"
        changed += int(diff.sum())
    assert changed == sum(int(m.sum()) for m in masks.values())


@needs_cuda
@pytest.mark.parametrize("method", ["ewc", "kfac"])
def test_bf16_model_on_cuda_keeps_fp32_state(tmp_path, method):
    trainer = _train_task0(tmp_path, method, "cuda", model=tiny_bert(0).to("cuda", torch.bfloat16))
    anchor, curvature = trainer.method.terms[0]
    assert all(t.dtype == torch.float32 and t.is_cuda for t in anchor.values())
    floats = [t for t in curvature.state_dict().values() if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float32 and t.is_cuda for t in floats)


@pytest.mark.skipif(
    not CUDA or torch.cuda.device_count() < 2, reason="needs 2 or more CUDA devices (DDP over NCCL)"
)
@pytest.mark.parametrize("method", ["ewc", "kfac"])
def test_ddp_over_nccl_equals_one_gpu(tmp_path, torchrun, method):
    sys.path.insert(0, str(ROOT / "tests" / "dist"))
    try:
        from common import GLOBAL_BATCH, one_step_params
    finally:
        sys.path.pop(0)
    os.environ["HF_CONTINUAL_TEST_DEVICE"] = "cuda"
    try:
        single = one_step_params(str(tmp_path / "a"), GLOBAL_BATCH, 1, method=method, prior_task=True)
        torchrun("scaling_dist.py", str(tmp_path), f"{method}:prior")
    finally:
        del os.environ["HF_CONTINUAL_TEST_DEVICE"]
    rank0 = torch.load(tmp_path / f"{method}:prior.rank0.pt", map_location="cpu")
    for n in single:  # NCCL's reduction order differs from one process's sum: fp32 rounding
        torch.testing.assert_close(rank0[n].cpu(), single[n].cpu(), rtol=1e-4, atol=1e-5)


# ---- everywhere ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ewc", "kfac"])
def test_state_loaded_into_float64_model_follows_the_model(tmp_path, method):
    """A CPU-visible stand-in for a device move: fp32 state loaded into a float64 model.

    Anchors take the parameters' dtype (never below fp32), curvature stays fp32, every tensor sits where its
    parameter is, and the penalty is the fp32 model's. Checked by breaking the code on purpose: without the
    placement at load, the anchors stay fp32 and this test fails.
    """
    trained = _train_task0(tmp_path, method, "cpu")
    trained.save_model(str(tmp_path / "saved"))
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(tmp_path / "saved").double()
    fresh = ContinualTrainer(model=model, args=_args(tmp_path, method, "cpu"))
    fresh.load_continual_state(tmp_path / "saved")
    assert_state_follows_model(fresh.method, fresh.model)
    anchor, curvature = fresh.method.terms[0]
    assert all(t.dtype == torch.float64 for t in anchor.values())
    assert all(t.dtype == torch.float32 for t in curvature.state_dict().values() if t.is_floating_point())
    shift = _shift(model)
    torch.testing.assert_close(_penalty_at(fresh, shift), _penalty_at(trained, shift), rtol=1e-5, atol=1e-9)


@pytest.mark.skipif(CUDA, reason="checks the CPU path of make gpu-check")
def test_gpu_check_on_a_cpu_machine_says_nothing_to_check():
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh")],
        env={**os.environ, "PY": sys.executable},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "no CUDA device: nothing to check"
