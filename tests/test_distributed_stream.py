"""Every method on 2 CPU processes (gloo) gives what 1 process gives on the same global batches."""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from stream_dist import run  # noqa: E402

METHODS = ["ewc", "kfac", "fish"]


@pytest.fixture(scope="module")
def dist_runs(tmp_path_factory, torchrun) -> Path:
    """The 2-process streams of every method of ``METHODS``, from one torchrun launch."""
    out = tmp_path_factory.mktemp("stream_dist")
    torchrun("stream_dist.py", str(out), *METHODS)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_two_process_stream_matches_one_process(tmp_path, dist_runs, method):
    single = run(method, str(tmp_path / "single"))
    out = dist_runs / method
    r0, r1 = torch.load(f"{out}.rank0"), torch.load(f"{out}.rank1")
    for n in r0["params"]:  # identical across ranks
        assert torch.equal(r0["params"][n], r1["params"][n]), n
    for i, row in enumerate(single["R"]):
        assert r0["R"][i] == pytest.approx(row, abs=1e-6)
    for n, p in single["params"].items():
        torch.testing.assert_close(r0["params"][n], p, rtol=1e-5, atol=1e-6)
    if "curvature" in single:
        floats = {k: v for k, v in single["curvature"].items() if v.is_floating_point()}
        scale = max(float(v.abs().max()) for v in floats.values())  # entries ~0 (e.g. key biases) are noise
        for k, v in floats.items():
            torch.testing.assert_close(
                r0["curvature"][k], v, rtol=1e-5, atol=1e-6 * scale, msg=lambda m, k=k: f"{k}: {m}"
            )
            assert torch.equal(r0["curvature"][k], r1["curvature"][k])
    if "masks" in single:
        for n, m in single["masks"].items():
            assert torch.equal(r0["masks"][n], m) and torch.equal(r1["masks"][n], m), n
    # the main process wrote every output file (results, heatmap, progress, final model + continual state);
    # the other rank wrote none
    written = sorted(os.listdir(f"{out}.d"))
    assert "results.json" in written and "accuracy_matrix.png" in written
    assert r1["writes"] == [], r1["writes"]
    rank0 = {os.path.basename(w) for w in r0["writes"]}
    assert {"results.json", "progress.json", "continual_state.json"} <= rank0, sorted(rank0)
    final = sorted(os.listdir(f"{out}.d/final"))
    assert "continual_state.safetensors" in final and "model.safetensors" in final, final
