"""Hugging Face configuration of an exported Free Transformer (``model_type = "freeformer"``).

Shipped beside the weights by ``freeformer export`` and loaded with
``trust_remote_code=True``; it needs only transformers (it must never import freeformer, which
the user of an exported model need not have). Decoder fields use Llama's names; the latent
path's fields are the paper's (H = ``latent_bits``, κ = ``free_bits``, block L/2+1 =
``inject_layer``).
"""

from __future__ import annotations

from transformers import PretrainedConfig

LATENT_MODES = ("encoder", "prior")


class FreeformerConfig(PretrainedConfig):
    model_type = "freeformer"

    def __init__(
        self,
        vocab_size: int = 256,
        hidden_size: int = 256,
        intermediate_size: int = 704,
        num_hidden_layers: int = 8,
        num_attention_heads: int = 8,
        num_key_value_heads: int | None = None,
        max_position_embeddings: int = 1024,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        rope_llama3: list | None = None,
        qkv_bias: bool = False,
        tie_word_embeddings: bool = False,
        latent_bits: int = 16,
        free_bits: float = 0.5,
        inject_layer: int | None = None,
        encoder_layers: int = 1,
        latent_embedding: str = "table",
        prefill_latents: str = "encoder",
        use_cache: bool = True,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        # Llama 3.1 RoPE rescaling as [factor, low_freq_factor, high_freq_factor,
        # original_max_position_embeddings], or None. Not "rope_scaling": transformers
        # rewrites that key into its own layout, which this file does not read.
        self.rope_llama3 = rope_llama3
        self.qkv_bias = qkv_bias
        self.use_cache = use_cache
        self.latent_bits = latent_bits
        """H: bits per latent code; Z_t takes 2^H values."""
        self.free_bits = free_bits
        """κ in bits per token (training only; recorded so the model can be trained on)."""
        self.inject_layer = num_hidden_layers // 2 if inject_layer is None else inject_layer
        """0-based decoder block whose keys/values read x + r (the paper's block L/2+1)."""
        self.encoder_layers = encoder_layers
        self.latent_embedding = latent_embedding
        """"table": the paper's 2^H × D post-sampler; "bits": linear in ±1 bits."""
        if prefill_latents not in LATENT_MODES:
            raise ValueError(
                f"prefill_latents = {prefill_latents!r}: expected one of {', '.join(LATENT_MODES)}"
            )
        self.prefill_latents = prefill_latents
        """Codes of a forward that starts at position 0 without pinned codes: "encoder" (the
        paper's prefill, Algorithm 2; the encoder reads every input token) or "prior"
        (uniform codes; use it to score text, where the encoder would see the answer)."""
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
