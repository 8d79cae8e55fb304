"""The Free Transformer and its matched baseline (architecture only).

Forward pass, paper Algorithm 2:
  x = embed(tokens); x = blocks[0 : L/2](x)                       (causal)
  codes: from the encoder over x (training, prefill), the uniform prior, or given
  r = post_sampler(codes)
  x = blocks[L/2](queries = x, keys/values = x + r)               (r never joins the residual)
  x = blocks[L/2+1 : L](x); logits = readout(norm(x))
With ``latent=False`` the same code is the plain decoder; shared parameters are drawn from
one generator in one order, so a baseline and a Free Transformer built with the same seed
start from identical shared weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from freeformer.config import ModelConfig
from freeformer.errors import DataError
from freeformer.latent import (
    LatentEncoder,
    PostSampler,
    check_codes,
    free_bits_loss,
    kl_per_token,
    token_mean,
    uniform_codes,
)
from freeformer.layers import Block, KVCache, RMSNorm, linear_cross_entropy, rope_tables

IGNORE_INDEX = -100
BIT_LOGIT_INIT_STD = 0.1
"""Std of the encoder's bit logits at initialisation, whatever the width (see init_latent_path)."""
INIT_STD = 0.02
"""Std of the projections and ζ at initialisation (output projections: INIT_STD / √(2L))."""


def _normal(p: Tensor, std: float, gen: torch.Generator) -> None:
    # Drawn on the CPU and copied, so the init is the same on every device.
    p.copy_(torch.randn(p.shape, generator=gen) * std)


def _init_block(b: Block, gen: torch.Generator, n_layers: int) -> None:
    out_std = INIT_STD / math.sqrt(2 * n_layers)
    _normal(b.attn.wq.weight, INIT_STD, gen)
    _normal(b.attn.wkv.weight, INIT_STD, gen)
    _normal(b.attn.wo.weight, out_std, gen)
    _normal(b.mlp.w_in.weight, INIT_STD, gen)
    _normal(b.mlp.w_out.weight, out_std, gen)
    b.attn_norm.weight.fill_(1.0)
    b.mlp_norm.weight.fill_(1.0)
    for lin in (b.attn.wq, b.attn.wkv):  # qkv_bias (pretrained Qwen2 shapes)
        if lin.bias is not None:
            lin.bias.zero_()


@dataclass
class ModelOutput:
    """What ``FreeTransformer.forward`` returns, whatever the flags.

    ``kl`` is the mean per-token KL(Q || uniform) in nats and ``kl_loss`` the free-bits term;
    both are 0 when no encoder posterior was used (baseline, prior or pinned codes). With
    targets, all three are per scored target (target not ``IGNORE_INDEX``): ``ce`` over the
    scored targets, ``kl`` and ``kl_loss`` over every code that reaches one (see forward);
    without, ``kl`` and ``kl_loss`` average every position.
    ``loss = ce + kl_loss`` when targets are given, else None.
    """

    logits: Tensor | None
    """(B, T, V), or (B, 1, V) with ``last_logits_only``; None with ``return_logits=False``."""
    loss: Tensor | None
    ce: Tensor | None
    kl: Tensor
    kl_loss: Tensor
    codes: Tensor | None = None
    """(B, T) latent codes used at each position (None for the baseline)."""
    kl_tokens: Tensor | None = None
    """(B, T) per-token KL in nats when the encoder ran (every position, ignored ones too)."""
    bit_logits: Tensor | None = None
    """(B, T, H) the encoder's bit logits when it ran (for log Q(Z | S))."""


class FreeTransformer(nn.Module):
    def __init__(self, config: ModelConfig, *, seed: int = 0) -> None:
        super().__init__()
        c = self.config = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.dim)
        self.blocks = nn.ModuleList(
            Block(c.dim, c.n_heads, c.n_kv_heads, c.mlp_hidden, c.norm_eps, c.qkv_bias)
            for _ in range(c.n_layers)
        )
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.head = None if c.tie_embeddings else nn.Linear(c.dim, c.vocab_size, bias=False)
        self.encoder = self.post_sampler = None
        if c.latent:
            self.encoder = LatentEncoder(
                c.dim,
                c.n_heads,
                c.n_kv_heads,
                c.mlp_hidden,
                c.norm_eps,
                c.encoder_layers,
                c.latent_bits,
                c.qkv_bias,
                c.encoder_window,
            )
            self.post_sampler = PostSampler(c.dim, c.latent_bits, c.latent_embedding)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        if self.tok_emb.weight.device.type != "meta":
            self.reset_buffers()
            self.init_weights(seed)

    def reset_buffers(self) -> None:
        """(Re)build the RoPE tables on the parameters' device (after ``to_empty``)."""
        c = self.config
        cos, sin = rope_tables(c.head_dim, c.max_seq_len, c.rope_theta, c.rope_llama3)
        device = self.tok_emb.weight.device
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    @classmethod
    def empty(cls, config: ModelConfig, device: torch.device | str = "cpu") -> FreeTransformer:
        """The model with its parameters allocated on ``device`` but not initialised (built
        on the meta device, then ``to_empty``): the one construction path for loading,
        resuming and converting, where every parameter is overwritten at once, so no random
        init is drawn only to be thrown away. The RoPE tables are built."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device)
        model.reset_buffers()
        return model

    # -------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Deterministic init from ``seed``, identical on every device.

        Draws happen on the CPU from explicit generators and are copied to the parameters'
        device. Shared parameters come from one stream in a fixed order; latent-path
        parameters from a second stream, so they never shift the shared draws.
        """
        c = self.config
        g = torch.Generator().manual_seed(seed)
        _normal(self.tok_emb.weight, c.embed_init_std, g)
        for b in self.blocks:
            _init_block(b, g, c.n_layers)
        self.norm.weight.fill_(1.0)
        if self.head is not None:
            _normal(self.head.weight, INIT_STD, g)
        if c.latent:
            self.init_latent_path(torch.Generator().manual_seed(seed + 1_000_003))

    @torch.no_grad()
    def init_latent_path(
        self,
        gen: torch.Generator,
        *,
        from_decoder: bool = False,
        post_sampler_std: float = 0.0,
    ) -> None:
        """Initialise the latent path (encoder incl. ζ and readout, post-sampler) from ``gen``.

        From scratch (``from_decoder=False``): random encoder blocks, the post-sampler at the
        residual stream's scale. On a pretrained decoder (``from_decoder=True``, used by
        ``freeformer convert``): encoder blocks = copies of decoder block L/2 and the
        post-sampler at 0, so that at step 0 the model computes the decoder's function under
        any codes. ζ and the readout are drawn alike in both. ``post_sampler_std`` > 0 (with
        ``from_decoder``) draws the post-sampler's rows at that std instead of 0: for the
        latent warm-up, whose ramp on r keeps step 0 at the source's function
        (``train.latent_ramp_steps``; docs/latent-study.md). Reasons: docs/design.md, "The
        latent path's initialisation" and "Starting from a pretrained decoder".
        """
        c = self.config
        # ζ only sets the query direction (it is RMS-normed before wq), but it is also the
        # encoder's residual stream: at scale 1 it would swamp the attention output and
        # give every position the same posterior. Small, like the other projections.
        _normal(self.encoder.zeta, INIT_STD, gen)
        for b in self.encoder.blocks:
            if from_decoder:
                # Block L/2 is trained to read the very residual stream x the encoder reads
                # as keys/values: useful features of x from the first step.
                b.load_state_dict(self.blocks[c.inject_layer].state_dict())
            else:
                _init_block(b, gen, c.n_layers)
        self.encoder.norm.weight.fill_(1.0)
        # The readout reads an RMS-normed vector (norm √D), so a fixed std would give bit
        # logits of std std·√D: KL at init then grows with width (≈ 3 bits/token at
        # D = 4096 with std 0.02, above κ from the first step). Scaling by 1/√D fixes the
        # bit logits' std at BIT_LOGIT_INIT_STD at every width: KL at init ≈ H·s²/8 nats
        # (0.03 bit at H = 16), well under any κ the paper uses (¼ bit and up), while
        # the encoder still gets gradient from the first step (a zero readout would
        # block it for one step). See docs/design.md.
        _normal(self.encoder.readout.weight, BIT_LOGIT_INIT_STD / math.sqrt(c.dim), gen)
        if from_decoder and not post_sampler_std:
            # r = 0 for every code: block L/2+1 reads keys/values from x + 0, the source's
            # block exactly. It still learns: its gradient is the one-hot scatter of dr.
            self.post_sampler.weight.zero_()
        else:
            # r must start at the residual stream's scale or the decoder learns to ignore it.
            lstd = post_sampler_std if from_decoder else c.resolved_latent_init_std
            ps_std = lstd if c.latent_embedding == "table" else lstd / math.sqrt(c.latent_bits)
            _normal(self.post_sampler.weight, ps_std, gen)

    # -------------------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.post_sampler is not None:
                n -= self.post_sampler.weight.numel()
        return n

    def _check_tokens(self, tokens: Tensor, pos: int, values: bool = True) -> None:
        c = self.config
        if tokens.dtype not in (torch.int64, torch.int32):
            raise DataError(f"tokens must be an integer tensor, got {tokens.dtype}")
        if tokens.dim() != 2:
            raise DataError(f"tokens must have shape (B, T), got {tuple(tokens.shape)}")
        T = tokens.shape[1]
        if pos + T > c.max_seq_len:
            raise DataError(
                f"sequence of {pos + T} tokens exceeds max_seq_len={c.max_seq_len}; "
                "shorten the input or raise model.max_seq_len"
            )
        if T == 0:
            raise DataError("tokens is empty (T = 0)")
        # The value check costs a host sync; on CUDA an out-of-range id already fails loudly
        # (device assert), so training there skips it. CPU and inference always check.
        if values and not torch.compiler.is_compiling() and not (tokens.is_cuda and self.training):
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= c.vocab_size:
                bad = hi if hi >= c.vocab_size else lo
                raise DataError(f"token id {bad} is outside [0, vocab_size={c.vocab_size})")

    def forward(
        self,
        tokens: Tensor,
        targets: Tensor | None = None,
        latents: Tensor | str | None = None,
        *,
        generator: torch.Generator | None = None,
        bit_noise: Tensor | None = None,
        cache: KVCache | None = None,
        last_logits_only: bool = False,
        check_inputs: bool = True,
        return_logits: bool = True,
        draws: int = 1,
    ) -> ModelOutput:
        """Run the model on ``tokens`` (B, T) or (T,).

        latents: None → codes sampled from the encoder's posterior (training and prefill);
        "prior" → uniform codes per token; a LongTensor (B, T) or (T,) → those codes.
        ``generator`` drives every latent draw; ``bit_noise`` (B, T, H) uniforms in [0, 1)
        may replace the posterior's draws (data-parallel training slices one global draw,
        so any number of processes samples the same latents). ``cache`` (a
        ``layers.KVCache``) makes this a prefill or decode step at position ``cache.pos``;
        encoder latents then need the whole prompt in one call, since the encoder is
        non-causal. ``check_inputs=False``
        skips the id-range checks (each costs a host sync) for callers that validated once,
        as generation's decode steps do. ``return_logits=False`` (with targets: training)
        computes the cross-entropy chunk by chunk without ever storing the (B, T, V) logits
        (``layers.linear_cross_entropy``); ``logits`` is then None.

        ``draws`` = m > 1 runs m independent draws of Z for every row in one call (importance
        sampling's k draws, ``freeformer.likelihood``): no code changes the first L/2 blocks
        or the encoder, so they run once on the B rows and the rest on m·B rows — row j·B + b
        of every output is draw j of row b. Given codes and ``bit_noise`` then have m·B rows;
        ``targets`` keep B. Not with a cache.

        Targets equal to ``IGNORE_INDEX`` are not scored by the cross-entropy. The KL and the
        free-bits hinge count every position whose code reaches a scored target (all
        positions up to the row's last scored one: a masked prompt's codes still condition
        the answer, so they must pay their KL) and are divided by the number of scored
        targets, like the cross-entropy (``latent.token_mean``). Ignored targets do not
        hide the input tokens: the decoder is causal, so tokens after the last scored position
        change nothing before it, but the encoder is non-causal and reads every input
        position — right-padding a sequence changes Q(Z | S) at its real positions, hence the
        sampled codes and the KL there. That is right for masked prompt tokens (the encoder
        should see them); a caller that pads should know the padding is part of what the
        encoder reads.
        """
        c = self.config
        if tokens.dim() == 1:
            tokens = tokens[None]
            targets = targets[None] if targets is not None else None
        if targets is not None and targets.shape != tokens.shape:
            raise DataError(
                f"targets shape {tuple(targets.shape)} != tokens shape {tuple(tokens.shape)}"
            )
        pos = cache.pos if cache is not None else 0
        static = isinstance(pos, Tensor)  # a static cache (generate.py): position on device
        self._check_tokens(tokens, 0 if static else pos, check_inputs)
        B, T = tokens.shape
        if static:  # fixed shapes, no host sync: capturable in a CUDA graph
            idx = pos + torch.arange(T, device=pos.device)
            cos, sin = self.rope_cos[idx], self.rope_sin[idx]
        else:
            cos, sin = self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T]
        layer_cache = (lambda i: cache.layers[i]) if cache is not None else (lambda i: None)

        x = self.tok_emb(tokens)
        for i in range(c.inject_layer):
            x = self.blocks[i](x, cos, sin, cache=layer_cache(i), pos=pos)
        if draws != 1:
            if draws < 1 or cache is not None or not c.latent:
                raise ValueError("draws > 1 needs a Free Transformer (latent) and no cache")
            B = B * draws  # the rows from the injection block on
            targets = targets.repeat(draws, 1) if targets is not None else None

        zero = x.new_zeros((), dtype=torch.float32)
        kl = kl_loss = zero
        codes = kl_tokens = bit_logits = None
        kv = None
        if c.latent:
            if latents is None:
                if static or pos != 0:
                    raise ValueError(
                        "encoder latents need the whole prompt in one call "
                        "(the encoder is non-causal); pass codes or 'prior'"
                    )
                bit_logits = self.encoder(x, cos, sin)
                if draws != 1:
                    bit_logits = bit_logits.repeat(draws, 1, 1)
                if bit_noise is not None and bit_noise.shape != bit_logits.shape:
                    raise DataError(
                        f"bit_noise has shape {tuple(bit_noise.shape)}; expected "
                        f"{tuple(bit_logits.shape)} (draws·B, T, H)"
                    )
                r, codes = self.post_sampler.sample(bit_logits, generator, bit_noise)
                kl_tokens = kl_per_token(bit_logits)
                # Per scored target, over the codes that reach one (latent.token_mean).
                scored = None if targets is None else targets != IGNORE_INDEX
                kl = token_mean(kl_tokens, scored)
                kl_loss = free_bits_loss(kl_tokens, c.free_bits_nats, scored)
            else:
                if isinstance(latents, str):
                    if latents != "prior":
                        raise DataError(
                            f"latents={latents!r}: use None (encoder), 'prior' or a tensor of codes"
                        )
                    codes = uniform_codes((B, T), c.latent_bits, x.device, generator)
                else:
                    codes = check_codes(latents, c.latent_bits, B, T, x.device, check_inputs)
                r = self.post_sampler.embed(codes)
            if draws != 1:
                x = x.repeat(draws, 1, 1)
            if self.post_sampler.r_scale != 1.0:  # training's latent warm-up only
                r = r * self.post_sampler.r_scale
            if c.latent_injection == "residual":  # opt-in variant: r joins the stream
                x = x + r.to(x.dtype)
            else:
                kv = x + r.to(x.dtype)  # the paper: r enters only block L/2+1's keys/values
        elif isinstance(latents, Tensor):
            raise DataError("latent codes given to a baseline model (latent=false), which has none")
        elif latents not in (None, "prior"):
            raise DataError(f"latents={latents!r}: use None, 'prior' or a tensor of codes")

        x = self.blocks[c.inject_layer](
            x, cos, sin, kv=kv, cache=layer_cache(c.inject_layer), pos=pos
        )
        for i in range(c.inject_layer + 1, c.n_layers):
            x = self.blocks[i](x, cos, sin, cache=layer_cache(i), pos=pos)
        if last_logits_only:
            x = x[:, -1:]
        h = self.norm(x)
        readout = self.tok_emb.weight if self.head is None else self.head.weight
        logits = ce = loss = None
        if return_logits or targets is None:
            logits = F.linear(h, readout)
        if targets is not None:
            if last_logits_only:
                raise ValueError("last_logits_only=True computes no logits to score targets with")
            if logits is None:  # training: the loss without the (B, T, V) logits
                ce = linear_cross_entropy(h, readout, targets, IGNORE_INDEX)
            else:
                ce = F.cross_entropy(
                    logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX
                )
            loss = ce + kl_loss
        if static:
            pos.add_(T)  # in place: a replayed CUDA graph advances it too
        elif cache is not None:
            cache.pos = pos + T
        return ModelOutput(
            logits=logits,
            loss=loss,
            ce=ce,
            kl=kl,
            kl_loss=kl_loss,
            codes=codes,
            kl_tokens=kl_tokens,
            bit_logits=bit_logits,
        )
