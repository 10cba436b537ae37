"""python kill_resume.py OUT_ROOT METHOD[,METHOD...]: ``hf-continual run recipes/toy.yaml`` per method, with a
checkpoint every 10 steps, three ways: OUT_ROOT/plain/METHOD uninterrupted; OUT_ROOT/killed/METHOD SIGKILLed at
step 25 of task 2 (after checkpoint-20 was written), then run again with ``--resume``.

Each run is a forked child of this process (imports paid once); prints one JSON line: for every run, the exit
code or ``"SIGKILL"``, what the killed run left on disk, and the step each task of the resumed run started from.
"""

import json
import os
import signal
import sys
from pathlib import Path

from transformers import TrainerCallback

import hf_continual.stream as stream
from hf_continual.cli import main

TOY_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "toy.yaml"
SAVE_STEPS, KILL_AT_STEP = 10, 25
SETTINGS = [
    "num_train_epochs=2",  # 64 steps per task (256 examples, batch 8); the toy tasks are learnt
    "per_device_train_batch_size=8",
    f"save_steps={SAVE_STEPS}",
    "fisher_num_samples=64",
    "fish_num_samples=64",
]


class KillInTask2(TrainerCallback):
    def __init__(self):
        self.task = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.task += 1

    def on_step_end(self, args, state, control, **kwargs):
        if self.task == 2 and state.global_step == KILL_AT_STEP:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordStarts(TrainerCallback):
    """The step each trained task starts from (a resumed task starts at its checkpoint's step)."""

    def __init__(self, path: str):
        self.path, self.starts = path, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.starts.append(state.global_step)
        Path(self.path).write_text(json.dumps(self.starts))


def _run(out: str, method: str, mode: str) -> int:
    """Fork a child running the CLI; returns its pid."""
    pid = os.fork()
    if pid:
        return pid
    try:
        callback = KillInTask2() if mode == "kill" else RecordStarts(os.path.join(out, f"{method}.starts"))
        run_stream = stream.run_stream  # run_recipe looks it up at call time
        stream.run_stream = lambda *a, **k: run_stream(
            *a, **{**k, "trainer_kwargs": {"callbacks": [callback]}}
        )
        argv = ["run", str(TOY_RECIPE), "--method", method, "--output-dir", os.path.join(out, method)]
        argv += ["--no-progress", *[a for s in SETTINGS for a in ("--set", s)]]
        code = main(argv + (["--resume"] if mode == "resume" else []))
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stderr.flush()
    os._exit(code)


def _wait(pids: dict[str, int]) -> dict[str, int | str]:
    out = {}
    for key, pid in pids.items():
        _, status = os.waitpid(pid, 0)
        out[key] = (
            "SIGKILL"
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9
            else os.waitstatus_to_exitcode(status)
        )
    return out


if __name__ == "__main__":
    root, methods = sys.argv[1], sys.argv[2].split(",")
    plain, killed = os.path.join(root, "plain"), os.path.join(root, "killed")
    pids = {f"plain/{m}": _run(plain, m, "plain") for m in methods}
    pids.update({f"kill/{m}": _run(killed, m, "kill") for m in methods})
    status = _wait(pids)
    for m in methods:
        run = Path(killed) / m
        status[f"after_kill/{m}"] = {
            "progress": (run / "progress" / "progress.json").is_file(),
            "checkpoints": sorted(p.name for p in (run / "tasks" / "01-toy-not-a").glob("checkpoint-*")),
            "results": (run / "results.json").exists(),
        }
    status.update(_wait({f"resume/{m}": _run(killed, m, "resume") for m in methods}))
    for m in methods:
        status[f"resume_starts/{m}"] = json.loads(Path(killed, f"{m}.starts").read_text())
    print(json.dumps(status))
