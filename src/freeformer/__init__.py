"""freeformer: the Free Transformer (F. Fleuret, arXiv 2510.17558)."""

from freeformer.config import ModelConfig
from freeformer.model import FreeTransformer, ModelOutput

__all__ = ["FreeTransformer", "ModelConfig", "ModelOutput"]
__version__ = "0.1.0"
