"""hf_continual: continual fine-tuning for Hugging Face transformers."""

__version__ = "0.1.0"

from .callbacks import ContinualCallback  # noqa: E402
from .config import ContinualConfig  # noqa: E402

# importing the dual encoder registers it with AutoConfig/AutoModel (AutoModel.from_pretrained(dir) works)
from .tasks.entity_linking import model as _dual_encoder  # noqa: E402, F401
from .trainer import ContinualTrainer  # noqa: E402

__all__ = ["ContinualCallback", "ContinualConfig", "ContinualTrainer", "__version__"]
