"""The penalty step through ContinualCallback vs the old private-hook path, and K-FAC's diagonal-part kernel.

On the packaged all-MiniLM-L6-v2 (8 labels, random examples, offline), side by side in one process:

- ``diag``: the diagonal part of a K-FAC curvature (embeddings, LayerNorm: every trainable parameter outside an
  ``nn.Linear``) adds ``lam * f * (p - p*)`` into ``.grad``: through ``DiagonalFisher.add_penalty_grad_``
  (``torch._foreach_*``, what ``KFACFisher.add_penalty_grad_`` now calls) vs the generic ``matvec`` kernel
  (``curvature_penalty_grad_``, which the diagonal part of K-FAC took before). Results checked equal.
- ``step``: training steps of a plain ``Trainer`` with an EWC penalty added (a) by ``ContinualCallback`` in
  ``on_pre_optimizer_step`` (penalty kept on the device, read at logging time) and (b) the way
  ``ContinualTrainer`` did it before, overriding the private ``Trainer._get_grad_norm`` and reading the penalty
  value back every step. Alternating runs; the time of the penalty hook itself and of the whole step.

Usage: ``HF_HUB_OFFLINE=1 python bench/bench_callback.py [--out bench/results/callback.json]``.
Timings: median (and best) over repeats; the machine may be shared (load average recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _setup import cpu_info, minilm_and_random_examples

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _stats(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "best_s": min(times), "runs": len(times)}


def bench_diag(model: torch.nn.Module, repeats: int) -> dict:
    from hf_continual.curvature import DiagonalFisher, curvature_penalty_grad_

    linear = {
        f"{m}.{a}" if m else a
        for m, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear)
        for a in ("weight", "bias")
    }
    params = {n: p for n, p in model.named_parameters() if p.requires_grad and n not in linear}
    g = torch.Generator().manual_seed(0)
    fisher = DiagonalFisher({n: torch.rand(p.shape, generator=g) for n, p in params.items()})
    anchors = {n: p.detach() + 0.01 * torch.randn(p.shape, generator=g) for n, p in params.items()}
    out = {"parameters": len(params), "entries": sum(p.numel() for p in params.values())}
    grads = {}
    for name, fn in (
        ("fast_foreach", lambda: fisher.add_penalty_grad_(params, anchors, 1.0)),
        ("generic_matvec", lambda: curvature_penalty_grad_(fisher, params, anchors, 1.0)),
    ):
        times, value = [], None
        for _ in range(repeats):
            for p in params.values():
                p.grad = torch.zeros_like(p)
            t0 = time.perf_counter()
            value = float(fn())
            times.append(time.perf_counter() - t0)
        grads[name] = {n: p.grad.clone() for n, p in params.items()}
        out[name] = {**_stats(times), "value": value}
    for n in params:
        torch.testing.assert_close(grads["fast_foreach"][n], grads["generic_matvec"][n], rtol=1e-5, atol=1e-8)
    out["generic_over_fast"] = out["generic_matvec"]["median_s"] / out["fast_foreach"]["median_s"]
    for p in params.values():
        p.grad = None
    return out


def bench_step(model: torch.nn.Module, data: list[dict], steps: int, repeats: int) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_continual.callbacks import ContinualCallback

    cb = ContinualCallback(method="ewc", continual_lambda=1e6, fisher_num_samples=32, fisher_batch_size=16)
    cb.end_task(model, data[:32], task_name="t0")
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    hook_times: dict[str, list[float]] = {"callback": [], "old_private_hook": []}

    class TimedCallback(ContinualCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            t0 = time.perf_counter()
            super().on_pre_optimizer_step(args, state, control, **kwargs)
            hook_times["callback"].append(time.perf_counter() - t0)

    timed = TimedCallback(method="ewc", continual_lambda=1e6)
    timed.method = cb.method

    class OldPath(Trainer):
        """The pre-callback ContinualTrainer: penalty added in the private _get_grad_norm, value read per step."""

        def _get_grad_norm(self, model, grad_norm=None):
            out = super()._get_grad_norm(model, grad_norm=grad_norm)
            t0 = time.perf_counter()
            value = cb.method.apply_gradients(self.model)
            if value is not None:
                float(value)
            hook_times["old_private_hook"].append(time.perf_counter() - t0)
            return out

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.t0)

    step_times: dict[str, list[float]] = {"callback": [], "old_private_hook": []}
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            use_cpu=True,
            report_to="none",
            max_steps=steps,
            per_device_train_batch_size=16,
            learning_rate=1e-5,
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
        )
        for _ in range(repeats):
            for path in ("callback", "old_private_hook"):
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        p.copy_(start[n])
                timer = StepTimer()
                if path == "callback":
                    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[timed, timer])
                else:
                    trainer = OldPath(model=model, args=args, train_dataset=data, callbacks=[timer])
                trainer.train()
                step_times[path].extend(timer.times[1:])  # the first step includes set-up
    return {
        "steps_per_run": steps,
        "penalty_hook": {k: _stats(v) for k, v in hook_times.items()},
        "training_step": {k: _stats(v) for k, v in step_times.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/callback.json")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--sections", nargs="+", default=["diag", "step"])
    ns = ap.parse_args()
    model, data, _, _ = minilm_and_random_examples(64, 32)
    result = {
        "model": "all-MiniLM-L6-v2 (8 labels)",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        **cpu_info(),
        "load_average_at_start": os.getloadavg(),
    }
    if "diag" in ns.sections:
        result["diag"] = bench_diag(model, ns.repeats)
        print(json.dumps(result["diag"], indent=1))
    if "step" in ns.sections:
        result["step"] = bench_step(model, data, ns.steps, max(1, ns.repeats // 3))
        print(json.dumps(result["step"], indent=1))
    result["load_average_at_end"] = os.getloadavg()
    from hf_continual.state import atomic_write_json

    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(ns.out, result)


if __name__ == "__main__":
    main()
