"""Pretrained decoders (Hugging Face Llama / Mistral / Qwen2 / SmolLM, GGUF) → freeformer.

:func:`convert` writes a run directory; :mod:`.sources` reads the files, :mod:`.convert`
maps the weights and adds the latent path.
"""

from freeformer.pretrained.convert import convert

__all__ = ["convert"]
