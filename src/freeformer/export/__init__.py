"""freeformer run → Hugging Face model directory; see :mod:`freeformer.export.hf`.

:mod:`.configuration_freeformer` and :mod:`.modeling_freeformer` are not used by freeformer
itself: they are the files an exported Free Transformer ships for ``trust_remote_code``.
"""

from freeformer.export.hf import ExportError, export

__all__ = ["ExportError", "export"]
