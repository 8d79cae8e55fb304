"""Brute-force references shared by the CPU and CUDA tests (a plain module, not a test file)."""

import torch.nn.functional as F

from freeformer.latent import bit_matrix


def dense_mapper(bit_logits, table, codes):
    """The paper's formulation, materialising one-hot and G: r = (Y + G − sg(G)) W (Eq. 8).

    Runs on the inputs' device and in their dtype (float64 for a reference)."""
    H = bit_logits.shape[-1]
    bits = bit_matrix(H, bit_logits.dtype, bit_logits.device)  # (2^H, H)
    logp, logq = F.logsigmoid(bit_logits), F.logsigmoid(-bit_logits)
    G = (logp @ bits.T + logq @ (1 - bits).T).exp()            # (..., 2^H)
    Y = F.one_hot(codes, 1 << H).to(bit_logits.dtype)
    return (Y + G - G.detach()) @ table
