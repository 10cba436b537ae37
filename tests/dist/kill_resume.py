"""python kill_resume.py OUT [kill]: the toy stream with EWC and checkpoints every 2 steps; with 'kill' the
process SIGKILLs itself in the middle of task 2 (after a checkpoint was written)."""

import os
import signal
import sys

from transformers import TrainerCallback

from hf_continual import ContinualConfig
from hf_continual.stream import run_stream
from hf_continual.toy import tiny_bert, toy_stream


class KillInTask2(TrainerCallback):
    def __init__(self):
        self.task = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.task += 1

    def on_step_end(self, args, state, control, **kwargs):
        if self.task == 2 and state.global_step == 5:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    out, mode = sys.argv[1], sys.argv[2]
    args = ContinualConfig(
        output_dir=out,
        continual_method="ewc",
        continual_lambda=1000.0,
        use_cpu=True,
        report_to="none",
        num_train_epochs=2,
        per_device_train_batch_size=16,
        learning_rate=2e-3,
        seed=0,
        save_strategy="steps",
        save_steps=2,
        logging_strategy="no",
        disable_tqdm=True,
        fisher_batch_size=16,
        fisher_num_samples=64,
        fisher_type="true",
    )
    callbacks = [KillInTask2()] if mode == "kill" else []
    result = run_stream(
        tiny_bert(0),
        toy_stream(n_train=64, n_eval=32),
        args,
        resume=(mode == "resume"),
        trainer_kwargs={"callbacks": callbacks},
    )
    print("DONE", result.accuracy_matrix)
