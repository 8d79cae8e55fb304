"""Numbers behind Figure 4: how much generated sequences that share a latent agree.

Figure 4 (Section 4.1) is read by eye: with a shared latent Z, sequences of one group share
the target position (κ = 1/8 bit), also the noise (κ = 1 bit), or stop being well formed
(κ = 8 bits); with independent Z (or a latent that carries nothing, κ = 1/64 bit) they
agree only by chance. These metrics put a number on each of those statements. A *group* is
a list of generated 66-character strings that share a prompt (and, for the "shared" groups,
one Z). Everything here works on strings and is independent of any model.

Definitions, for one group (pairs are unordered pairs of distinct *valid* sequences, as
defined by :func:`freeformer.data.synthetic.parse`):

- ``validity``: fraction of the group's sequences that are valid.
- ``position_agreement``: fraction of pairs whose targets start at the same position.
  Under independent positions (uniform over 57 starts) its expectation is 1/57.
- ``position_abs_diff``: mean ``|p_i - p_j|`` over pairs (19.0 for independent uniform starts).
- ``noise_jaccard``: mean Jaccard index ``|A ∩ B| / |A ∪ B|`` of the pairs' sets of
  ``'!'`` body positions, with ``J(∅, ∅) = 1`` (two noiseless sequences have the same
  noise). Independent noise gives about 0.03.

The three pair metrics are ``None`` when the group has fewer than two valid sequences.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import combinations

from freeformer.data.synthetic import parse
from freeformer.errors import DataError

METRICS = ("validity", "position_agreement", "position_abs_diff", "noise_jaccard")


def jaccard(a: frozenset[int], b: frozenset[int]) -> float:
    """Jaccard index of two sets; 1.0 for two empty sets."""
    union = len(a | b)
    return 1.0 if union == 0 else len(a & b) / union


def group_metrics(group: Sequence[str]) -> dict:
    """Metrics of one group (see the module docstring) plus ``n_sequences``, ``n_valid``
    and ``n_pairs`` (number of pairs of valid sequences)."""
    if isinstance(group, str) or len(group) == 0:
        raise DataError("a group must be a non-empty list of generated strings")
    parsed = [parse(s) for s in group]
    valid = [p for p in parsed if p.valid]
    pairs = list(combinations(valid, 2))
    out: dict = {
        "validity": len(valid) / len(parsed),
        "position_agreement": None,
        "position_abs_diff": None,
        "noise_jaccard": None,
        "n_sequences": len(parsed),
        "n_valid": len(valid),
        "n_pairs": len(pairs),
    }
    if pairs:
        n = len(pairs)
        out["position_agreement"] = sum(a.position == b.position for a, b in pairs) / n
        out["position_abs_diff"] = sum(abs(a.position - b.position) for a, b in pairs) / n
        out["noise_jaccard"] = sum(jaccard(a.noise, b.noise) for a, b in pairs) / n
    return out


def aggregate(groups: Iterable[Sequence[str]]) -> dict:
    """Group-weighted means of each metric over ``groups``, plus counts.

    Each group counts once, whatever its size or number of valid pairs, so that a few
    well-formed groups do not outweigh many broken ones (a group with < 2 valid sequences
    is skipped for the pair metrics; a metric no group defines is ``None``). Counts:
    ``n_groups``, ``n_sequences``, ``n_valid``, ``n_pairs`` (totals) and
    ``n_groups_with_pairs`` (groups that contribute to the pair metrics).
    """
    per_group = [group_metrics(g) for g in groups]
    if not per_group:
        raise DataError("aggregate needs at least one group")
    out: dict = {}
    for name in METRICS:
        values = [m[name] for m in per_group if m[name] is not None]
        out[name] = sum(values) / len(values) if values else None
    out["n_groups"] = len(per_group)
    for name in ("n_sequences", "n_valid", "n_pairs"):
        out[name] = sum(m[name] for m in per_group)
    out["n_groups_with_pairs"] = sum(m["n_pairs"] > 0 for m in per_group)
    return out
