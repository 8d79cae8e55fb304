"""The one device resolver: "auto" means CUDA when there is one, and a device that cannot be
used is one clear error naming the flag."""

import pytest
import torch

import freeformer.runtime as runtime
from freeformer.errors import ConfigError
from freeformer.runtime import resolve_device


def test_auto_follows_cuda_availability_and_cuda_gets_the_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu", local_rank=3) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("auto", local_rank=3) == torch.device("cuda", 3)
    assert resolve_device("cuda", local_rank=2) == torch.device("cuda", 2)
    assert resolve_device("cuda:1", local_rank=2) == torch.device("cuda", 1)  # named wins


def test_unusable_devices_are_one_line_errors_naming_the_flag(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"train.device = 'cuda' but CUDA is not available"):
        resolve_device("cuda", flag="train.device")
    with pytest.raises(ConfigError, match=r"--device = 'gpu': expected auto, cpu, cuda"):
        resolve_device("gpu")
    with pytest.raises(ConfigError, match=r"--device = 'meta': expected"):
        resolve_device("meta")


def test_every_caller_resolves_devices_here():
    """train, generate, validate and the lm-eval adapter resolve "auto" in runtime.py only."""
    import ast
    from pathlib import Path

    src = Path(runtime.__file__).parent
    offenders = []
    for path in src.rglob("*.py"):
        if path.name == "runtime.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            # torch.cuda.is_available() outside runtime.py is a second resolver in the making
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "is_available"
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "cuda"
            ):
                offenders.append(f"{path.relative_to(src)}:{node.lineno}")
    assert not offenders, offenders
