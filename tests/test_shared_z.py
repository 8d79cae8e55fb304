"""Figure 4 on text (freeformer.experiments.shared_z): the similarity measures, the prompts,
and that the shared group really shares Z while the independent group does not."""

import pytest
import torch

from freeformer import FreeTransformer, ModelConfig
from freeformer.data.tokenizer import ByteTokenizer
from freeformer.errors import DataError, UserError
from freeformer.experiments.shared_z import (
    group_similarity,
    line_prompts,
    pair_similarity,
    sample_groups,
    shared_z_study,
)

CFG = ModelConfig.preset("debug")


def test_pair_similarity_by_hand():
    a, b = [1, 2, 3, 4, 5], [1, 2, 3, 9, 9]
    s = pair_similarity(a, b, "\n  x = 1\ny", "x = 1  \nz")
    # First non-blank lines "x = 1" agree; 3 common leading tokens; difflib matches the block
    # [1, 2, 3]: 2·3 / (5 + 5); no 4-gram in common.
    assert s == {"first_line": 1.0, "prefix_tokens": 3.0, "similarity": 0.6, "ngram_jaccard": 0.0}
    s = pair_similarity([7, 1, 2, 3, 4], [1, 2, 3, 4, 8], "a\n", "b\n")
    assert s["first_line"] == 0.0 and s["prefix_tokens"] == 0.0
    assert s["similarity"] == pytest.approx(0.8)  # block [1, 2, 3, 4]: 2·4 / 10
    assert s["ngram_jaccard"] == pytest.approx(1 / 3)  # {(1,2,3,4)} of 3 distinct 4-grams


def test_group_similarity_is_the_mean_over_pairs():
    ids = [[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8]]
    texts = ["x\n", "x\n", "y\n"]
    g = group_similarity(ids, texts)
    # Pairs: (0,1) identical; (0,2) and (1,2) share nothing.
    assert g == {
        "first_line": pytest.approx(1 / 3),
        "prefix_tokens": pytest.approx(4 / 3),
        "similarity": pytest.approx(1 / 3),
        "ngram_jaccard": pytest.approx(1 / 3),
    }
    with pytest.raises(DataError):
        group_similarity([[1]], ["a"])


def test_line_prompts_end_a_line_and_skip_rows_without_one():
    tok = ByteTokenizer()
    rows = [
        tok.encode("no line end here at all, none"),
        tok.encode("def f():\n    return 1\nx = 2"),
    ]
    (p,) = line_prompts(rows, tok.decode, 1, max_tokens=64, min_tokens=4)
    assert tok.decode(p) == "def f():\n    return 1\n"
    # The cap applies before the cut: within 12 tokens the last line end is the first one.
    (p,) = line_prompts(rows, tok.decode, 1, max_tokens=12, min_tokens=4)
    assert tok.decode(p) == "def f():\n"
    with pytest.raises(DataError, match="only 1 of the 2 prompts"):
        line_prompts(rows, tok.decode, 2, max_tokens=64)


def listening_model():
    """A debug Free Transformer whose decoder listens to Z (as in test_generate.py)."""
    m = FreeTransformer(CFG, seed=0).eval()
    with torch.no_grad():
        m.blocks[CFG.inject_layer].attn.wo.weight.mul_(300)
        m.head.weight.mul_(30)
    return m


def test_shared_group_shares_z_and_independent_group_does_not():
    """Near-greedy sampling (temperature 1e-4) makes a continuation a function of the prompt
    and the codes: the shared group's G continuations are then identical, the independent
    group's are not (the model listens to Z)."""
    model = listening_model()
    prompt = torch.randint(0, CFG.vocab_size, (6,), generator=torch.Generator().manual_seed(1))
    ind, sha = sample_groups(model, prompt.tolist(), 4, 10, torch.Generator().manual_seed(0), 1e-4)
    assert len(ind) == len(sha) == 4 and all(len(r) == 10 for r in ind + sha)
    assert all(r == sha[0] for r in sha)
    assert len({tuple(r) for r in ind}) > 1
    tok = ByteTokenizer()
    res = shared_z_study(
        model,
        tok,
        [prompt.tolist()] * 3,
        group_size=4,
        new_tokens=10,
        temperature=1e-4,
        n_examples=1,
    )
    s = res["summary"]
    assert s["similarity"]["shared"] == 1.0 and s["prefix_tokens"]["shared"] == 10.0
    assert s["similarity"]["independent"] < 1.0 and s["similarity"]["shared_wins"] == 3
    assert len(res["examples"]) == 1 and len(res["examples"][0]["shared"]) == 4
    with pytest.raises(UserError):
        shared_z_study(model, tok, [prompt.tolist()], group_size=1)


def test_baseline_groups_are_the_same_distribution():
    """The control: without a latent, "shared" and "independent" rows are plain samples of one
    distribution, so near-greedy sampling makes all 2·G continuations identical."""
    model = FreeTransformer(CFG.replace(latent=False), seed=0).eval()
    ind, sha = sample_groups(model, [1, 2, 3], 3, 8, torch.Generator().manual_seed(0), 1e-4)
    assert len(ind) == len(sha) == 3 and all(r == ind[0] for r in ind + sha)
