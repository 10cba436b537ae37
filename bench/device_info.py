"""Print the accelerator and library versions of this machine as JSON (the first record of a GPU run)."""

import json
import platform

import torch
import transformers

print(
    json.dumps(
        {
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        indent=2,
    )
)
