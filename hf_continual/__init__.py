"""hf_continual: continual fine-tuning for Hugging Face transformers."""

__version__ = "0.1.0"

from .config import ContinualConfig  # noqa: E402
from .trainer import ContinualTrainer  # noqa: E402

__all__ = ["ContinualConfig", "ContinualTrainer", "__version__"]
