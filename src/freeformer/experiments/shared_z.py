"""Figure 4 on real text: are continuations that share one Z more alike? (issue #17 item 4)

The paper shows what Z encodes only on the synthetic task (Section 4.1, Figure 4). On text
the same protocol applies unchanged: from one prompt, a group of G continuations in which
every sequence reads its own draw of Z from the uniform prior at every position, prompt
included (*independent*), and a group of G that all read one draw (*shared*). The two groups
differ only in sharing, so any excess similarity of the shared group is what Z fixes. Both
groups come from one :func:`~freeformer.generate.generate` call, at the same temperature.

Similarity of two continuations (the generated tokens only; each prompt ends a line, so
each continuation starts one):

- ``first_line``: 1 if their first non-blank lines are identical after stripping (for code,
  the next statement — the "approach" at the finest grain), else 0;
- ``prefix_tokens``: length of their common token prefix (how long they stay together);
- ``similarity``: :class:`difflib.SequenceMatcher` ratio of the token sequences, 2M/(|a|+|b|)
  with M the tokens in matching blocks (token-level edit similarity, in [0, 1]);
- ``ngram_jaccard``: Jaccard index of their sets of token 4-grams.

A group's value is the mean over its unordered pairs; a metric's summary is over prompts:
mean independent, mean shared, and the paired difference's mean, standard error and the
number of prompts where shared > independent. For a baseline (no latent) both groups are
independent draws of the same distribution: the control, with differences at chance.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence
from itertools import combinations
from typing import Any

import torch

from freeformer.errors import DataError, UserError
from freeformer.experiments.scoring import jaccard

METRICS = ("first_line", "prefix_tokens", "similarity", "ngram_jaccard")
NGRAM = 4


def first_line(text: str) -> str:
    """The first line of ``text`` with non-blank content, stripped ("" if none)."""
    return next((s.strip() for s in text.split("\n") if s.strip()), "")


def _ngrams(ids: Sequence[int]) -> frozenset[tuple[int, ...]]:
    return frozenset(tuple(ids[i : i + NGRAM]) for i in range(len(ids) - NGRAM + 1))


def pair_similarity(a: Sequence[int], b: Sequence[int], a_text: str, b_text: str) -> dict:
    """The four similarities (module docstring) of two continuations, given as token ids
    and their decoded text."""
    prefix = 0
    for x, y in zip(a, b):
        if x != y:
            break
        prefix += 1
    return {
        "first_line": float(first_line(a_text) == first_line(b_text)),
        "prefix_tokens": float(prefix),
        "similarity": difflib.SequenceMatcher(None, list(a), list(b), autojunk=False).ratio(),
        "ngram_jaccard": jaccard(_ngrams(a), _ngrams(b)),
    }


def group_similarity(ids: Sequence[Sequence[int]], texts: Sequence[str]) -> dict:
    """Mean of each similarity over the unordered pairs of one group (≥ 2 continuations)."""
    if len(ids) < 2 or len(ids) != len(texts):
        raise DataError("a group needs at least two continuations, each with its text")
    pairs = [
        pair_similarity(ids[i], ids[j], texts[i], texts[j])
        for i, j in combinations(range(len(ids)), 2)
    ]
    return {m: sum(p[m] for p in pairs) / len(pairs) for m in METRICS}


def line_prompts(
    rows: Iterable[Sequence[int]], decode, n: int, max_tokens: int, min_tokens: int = 16
) -> list[list[int]]:
    """``n`` prompts: the first ≤ ``max_tokens`` tokens of successive ``rows`` (held-out
    windows), cut after the last token that ends a line, so that every continuation starts a
    line. Rows with no line end between ``min_tokens`` and ``max_tokens`` are skipped."""
    out: list[list[int]] = []
    for row in rows:
        head = [int(t) for t in row[:max_tokens]]
        ends = [i for i, t in enumerate(head) if i + 1 >= min_tokens and decode([t]).endswith("\n")]
        if ends:
            out.append(head[: ends[-1] + 1])
        if len(out) == n:
            return out
    raise DataError(
        f"only {len(out)} of the {n} prompts found: the held-out windows have too few line "
        f"ends in their first {max_tokens} tokens (ask for fewer prompts or longer ones)"
    )


@torch.no_grad()
def sample_groups(
    model,
    prompt: Sequence[int],
    group_size: int,
    new_tokens: int,
    gen: torch.Generator,
    temperature: float = 1.0,
    eos_id: int | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """(independent, shared) groups of ``group_size`` continuations of ``prompt``: token ids of
    the generated part, cut at ``eos_id``. One generate call of 2·G rows; for a baseline the
    codes are absent and both groups are plain samples."""
    from freeformer.generate import generate
    from freeformer.latent import uniform_codes

    c = model.config
    device = model.tok_emb.weight.device
    G, T0 = group_size, len(prompt)
    latents = None
    if c.latent:
        T = T0 + new_tokens
        independent = uniform_codes((G, T), c.latent_bits, device, gen)
        shared = uniform_codes((1, T), c.latent_bits, device, gen)
        latents = torch.cat([independent, shared.expand(G, -1)])
    x = torch.tensor(list(prompt), dtype=torch.long, device=device)[None].expand(2 * G, -1)
    out = generate(
        model, x, new_tokens, temperature=temperature, latents=latents, generator=gen, eos_id=eos_id
    )
    rows = out[:, T0:].tolist()
    if eos_id is not None:
        rows = [r[: r.index(eos_id)] if eos_id in r else r for r in rows]
    return rows[:G], rows[G:]


def _summary(ind: list[float], sha: list[float]) -> dict:
    d = [s - i for i, s in zip(ind, sha)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else float("nan")
    return {
        "independent": sum(ind) / n,
        "shared": sum(sha) / n,
        "diff": mean,
        "diff_se": sd / math.sqrt(n),
        "shared_wins": sum(x > 0 for x in d),
        "ties": sum(x == 0 for x in d),
        "prompts": n,
    }


def shared_z_study(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    group_size: int = 8,
    new_tokens: int = 96,
    temperature: float = 1.0,
    seed: int = 0,
    n_examples: int = 2,
) -> dict[str, Any]:
    """Sample an independent and a shared group per prompt and score both (module
    docstring). Returns ``summary`` (per metric), ``per_prompt`` scores and ``examples``
    (the texts of the first ``n_examples`` prompts' groups)."""
    if group_size < 2 or new_tokens < 1 or not prompts or temperature <= 0:
        raise UserError(
            "need --group-size ≥ 2, --new-tokens ≥ 1, at least one prompt and a temperature > 0"
        )
    gen = torch.Generator(device=model.tok_emb.weight.device).manual_seed(seed)
    per_prompt, examples = [], []
    for k, p in enumerate(prompts):
        groups = sample_groups(
            model, p, group_size, new_tokens, gen, temperature, getattr(tokenizer, "eos_id", None)
        )
        texts = [[tokenizer.decode(r) for r in g] for g in groups]
        scores = [group_similarity(g, t) for g, t in zip(groups, texts)]
        per_prompt.append({"independent": scores[0], "shared": scores[1]})
        if k < n_examples:
            examples.append(
                {"prompt": tokenizer.decode(list(p)), "independent": texts[0], "shared": texts[1]}
            )
    summary = {
        m: _summary([s["independent"][m] for s in per_prompt], [s["shared"][m] for s in per_prompt])
        for m in METRICS
    }
    return {
        "latent": bool(model.config.latent),
        "group_size": group_size,
        "new_tokens": new_tokens,
        "temperature": temperature,
        "seed": seed,
        "summary": summary,
        "per_prompt": per_prompt,
        "examples": examples,
    }


def format_summary(result: dict[str, Any]) -> str:
    """One table row per metric: independent, shared, shared − independent ± s.e., wins."""
    lines = [
        f"{'metric':14s} {'independent':>11s} {'shared':>8s} {'shared − ind (± s.e.)':>22s} "
        f"{'shared > ind':>13s}"
    ]
    for m, s in result["summary"].items():
        lines.append(
            f"{m:14s} {s['independent']:11.3f} {s['shared']:8.3f} "
            f"{s['diff']:+13.3f} ± {s['diff_se']:.3f} {s['shared_wins']:>7d} of {s['prompts']}"
        )
    return "\n".join(lines)
