"""A decode step with fixed shapes, replayable as a CUDA graph.

Eager decoding launches a few hundred small kernels per token from Python; at batch 1 on a
GPU that launch cost, not the arithmetic, sets the speed (bench/RESULTS.md, GPU section).
Here one decode step keeps every shape fixed — the preallocated cache is written in place at
a position held in a device tensor, attention reads the whole cache with the positions after
it masked, RoPE angles are gathered by that tensor — so the step has no host sync and the
same kernels every time: on CUDA it is captured once in a ``torch.cuda.CUDAGraph`` and each
token is one replay. Sampling stays outside the graph (it may use a generator and filters).

The step computes the same function as an eager cached step (tests/test_generate.py checks
the logits on the CPU, where the static step runs without a graph, and tests/test_cuda.py
with the graph).
"""

from __future__ import annotations

import torch
from torch import Tensor

from freeformer.model import FreeTransformer


class StaticDecodeStep:
    """Decode steps at a static cache position, after a prefill of ``cache``.

    ``cache`` is the generation's KV cache (its ``pos`` an int after the prefill); it is
    switched to a device position tensor here. ``graph=True`` captures the step in a CUDA
    graph (CUDA only); otherwise the same static step runs eagerly. Calling the object with
    the new tokens (B, 1) and, for a Free Transformer, their codes (B, 1) returns the logits
    (B, V) of the next position and advances the cache by one. The returned tensor is reused
    by the next call: read (or copy) it before calling again.
    """

    def __init__(
        self, model: FreeTransformer, cache, batch_size: int, *, graph: bool = False
    ) -> None:
        device = model.tok_emb.weight.device
        if graph and device.type != "cuda":
            raise ValueError(f"CUDA-graph decoding needs a CUDA model; this one is on {device}")
        self.model, self.cache, self.graph = model, cache, None
        self.latent = model.config.latent
        start = int(cache.pos)
        cache.pos = torch.tensor(start, device=device)
        # Attention reads the whole buffer with unwritten positions masked, but a masked
        # weight of 0 times a NaN left in uninitialised memory is still NaN: clear them.
        for layer in cache.layers:
            layer.k[:, :, start:].zero_()
            layer.v[:, :, start:].zero_()
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.codes = (
            torch.zeros(batch_size, 1, dtype=torch.long, device=device) if self.latent else None
        )
        self.logits: Tensor | None = None
        if graph:
            # Warm up on a side stream (lazy inits, allocator), then capture one step. The
            # warm-up writes garbage K/V at `start` and advances the position: reset it. The
            # garbage is overwritten by the first real step before any query can read it.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._step()
                    cache.pos.fill_(start)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._step()
            cache.pos.fill_(start)  # capture ran nothing, but keep it explicit

    def _step(self) -> Tensor:
        out = self.model(
            self.tokens,
            latents=self.codes,
            cache=self.cache,
            last_logits_only=True,
            check_inputs=False,
        )
        return out.logits[:, -1]

    def __call__(self, tokens: Tensor, codes: Tensor | None = None) -> Tensor:
        self.tokens.copy_(tokens)
        if self.latent:
            self.codes.copy_(codes)
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.logits
