"""torchrun --nproc_per_node 2 group_jobs.py OUT JOB ...: each JOB (a module here with ``run(out_dir)``, which works
in an initialised process group) runs in one gloo group, into ``OUT/JOB/``. Several jobs share one launch:
starting the processes costs more than the jobs."""

import importlib
import os
import sys

import common  # noqa: F401  (destroys the process group at exit)
import torch.distributed as dist

if __name__ == "__main__":
    out = sys.argv[1]
    dist.init_process_group("gloo")
    for job in sys.argv[2:]:
        job_dir = os.path.join(out, job)
        os.makedirs(job_dir, exist_ok=True)
        importlib.import_module(job).run(job_dir)
        dist.barrier()  # every rank's files are written before the next job (and before the pytest side reads)
