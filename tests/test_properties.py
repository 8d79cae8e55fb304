"""Property-based tests (hypothesis) where the input space is too large to list by hand:
config overrides and their TOML round trip, tokenizer round trips, codes ↔ bits, and the
sampling filters. Example counts are kept small so the default run stays fast."""

import contextlib
import importlib.util
import io
import math
import sys
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from freeformer.cli import main
from freeformer.data import synthetic
from freeformer.data.tokenizer import EOS_TOKEN, ByteTokenizer
from freeformer.errors import ConfigError
from freeformer.generate import sample
from freeformer.latent import bit_matrix, codes_to_bits, sample_codes
from freeformer.likelihood import log_q
from freeformer.runconfig import DATA_SOURCES, PRECISIONS, TRAINABLE, build_run_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# derandomize: the same examples on every run (CI never turns red by chance; a new failure
# shows up when the code changes, not when the dice do); no example database on disk.
FAST = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# ---------------------------------------------------------------------------------------
# Config: overrides land where they say, and `freeformer config` prints a TOML that
# parses back to the very same config
# ---------------------------------------------------------------------------------------
# Every text a user could type, TOML-hostile characters included (quotes, backslashes,
# newlines, control characters).
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
finite = st.floats(allow_nan=False, allow_infinity=False)
prob = st.floats(0, 1, exclude_max=True)


def _bool_text(b):
    return st.sampled_from(
        ["true", "1", "yes", "on", "True", "ON"] if b else ["false", "0", "no", "off", "False"]
    )


def _float_text(x):
    # An override may be written as repr, in exponent form, or as a fraction (a/b).
    return st.sampled_from([repr(x), f"{x:.17e}"])


TRAIN_FIELDS = {  # field → strategy of valid values
    "max_steps": st.integers(1, 10**9),
    "batch_size": st.integers(1, 4096),
    "micro_batch_size": st.integers(0, 64),
    "lr": st.floats(1e-12, 10.0),
    "min_lr_ratio": st.floats(0, 1),
    "warmup_steps": st.integers(0, 10**6),
    "weight_decay": st.floats(0, 10),
    "beta1": prob,
    "beta2": prob,
    "grad_clip": st.floats(0, 100),
    "seed": st.integers(0, 2**62),
    "log_every": st.integers(1, 1000),
    "eval_every": st.integers(0, 1000),
    "importance_samples": st.integers(1, 64),
    "keep_last": st.integers(1, 10),
    "compile": st.booleans(),
    "precision": st.sampled_from(PRECISIONS),
    "trainable": st.sampled_from(TRAINABLE),
    "latent_lr_scale": st.floats(1e-6, 1e3),
    "wandb_project": texts,
    "init_from": texts,
}
MODEL_FIELDS = {
    "latent_bits": st.integers(1, 16),
    "free_bits": st.floats(0, 4),
    "n_layers": st.integers(2, 6),  # the latent needs a block before it
    "rope_theta": st.floats(1.0, 1e7),
    "norm_eps": st.floats(1e-12, 1e-2),
    "tie_embeddings": st.booleans(),
    "latent": st.booleans(),
    "latent_embedding": st.sampled_from(["table", "bits"]),
}


@st.composite
def overrides(draw):
    """(override strings, {(section, key): expected value}) for a valid run config."""
    out, want = [], {}

    def add(section, key, value):
        if isinstance(value, bool):
            text = draw(_bool_text(value))
        elif isinstance(value, float):
            text = draw(_float_text(value))
        else:
            text = str(value)
        out.append(f"--{section}.{key}={text}")
        want[section, key] = value

    for key in draw(st.lists(st.sampled_from(sorted(MODEL_FIELDS)), unique=True, max_size=4)):
        add("model", key, draw(MODEL_FIELDS[key]))
    for key in draw(st.lists(st.sampled_from(sorted(TRAIN_FIELDS)), unique=True, max_size=8)):
        add("train", key, draw(TRAIN_FIELDS[key]))
    source = draw(st.sampled_from(DATA_SOURCES))
    if source in ("files", "stdlib"):
        add("data", "path", draw(texts.filter(bool)))
    add("data", "source", source)
    # The synthetic task fixes seq_len = 65; other sources take any length up to max_seq_len.
    add("train", "seq_len", 65 if source == "synthetic" else draw(st.integers(1, 128)))
    return draw(st.permutations(out)), want


def _config_toml(argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["config", *argv]) == 0
    return buf.getvalue()


@FAST
@given(overrides(), st.booleans())
def test_overrides_apply_and_config_round_trips_through_toml(tmp_path_factory, ov, in_file):
    argv, want = ov
    # The overridden sections absent from the file, or present and empty.
    base = {"model": {"preset": "debug"}, **({"train": {}, "data": {}} if in_file else {})}
    try:
        cfg = build_run_config(base, argv)
    except ConfigError as e:  # only cross-field rules may refuse a drawn combination
        assert "train.trainable" in str(e) or "at most latent_bits" in str(e), e
        assume(False)
    for (section, key), value in want.items():
        assert getattr(getattr(cfg, section), key) == value, (section, key)

    path = tmp_path_factory.mktemp("cfg") / "base.toml"
    path.write_text(
        '[model]\npreset = "debug"\n' + ("[train]\n[data]\n" if in_file else ""), encoding="utf-8"
    )
    text = _config_toml(["--config", str(path), *argv])  # what `freeformer config` prints
    again = build_run_config(tomllib.loads(text))
    assert again == cfg
    assert again.model.to_dict() == cfg.model.to_dict()


# ---------------------------------------------------------------------------------------
# Tokenizers: decode(encode(text)) == text
# ---------------------------------------------------------------------------------------
any_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)


@FAST
@given(any_text)
def test_byte_tokenizer_round_trips_any_text(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text])[0].tolist() == ids


@FAST
@given(st.lists(st.integers(-5, 300), max_size=50))
def test_byte_tokenizer_decodes_any_ids_without_raising(ids):
    tok = ByteTokenizer()
    out = tok.decode(ids)
    # Runs of byte ids decode as UTF-8 (bad bytes → U+FFFD); EOS and stray ids split runs.
    pieces, run = [], bytearray()
    for i in ids:
        if 0 <= i < 256:
            run.append(i)
            continue
        pieces += [run.decode("utf-8", errors="replace"), EOS_TOKEN if i == 256 else "\ufffd"]
        run = bytearray()
    assert out == "".join(pieces) + run.decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def bpe():
    if importlib.util.find_spec("tokenizers") is None:
        pytest.skip("needs freeformer[hf]")
    from freeformer.data.tokenizer import train_bpe

    words = ["def", "return", "self", "lambda", "x", "éà", "中文", "🙂", "  ", "\n", "\t"]
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(30)) for i in range(40)]
    return train_bpe(texts, 300)


@settings(FAST, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        any_text,
        st.lists(
            st.sampled_from(["def", " ", EOS_TOKEN, "<|", "é", "\n", "🙂", "x"]), max_size=20
        ).map("".join),
    )
)
def test_bpe_round_trips_any_text_and_never_forges_eos(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.eos_id not in ids  # "<|endoftext|>" in a document stays plain text
    assert bpe.decode(ids) == text


@FAST
@given(st.text(st.sampled_from(synthetic.ALPHABET), max_size=80))
def test_synthetic_alphabet_round_trips(s):
    ids = synthetic.encode(s)
    assert synthetic.decode(ids) == s
    assert ids.tolist() == [synthetic.ALPHABET.index(c) for c in s]


@FAST
@given(st.lists(st.integers(-3, synthetic.VOCAB_SIZE + 3), max_size=80))
def test_synthetic_decode_marks_foreign_ids(ids):
    out = synthetic.decode(ids)
    assert len(out) == len(ids)
    for i, c in zip(ids, out):
        assert c == (synthetic.ALPHABET[i] if 0 <= i < synthetic.VOCAB_SIZE else "?")


# ---------------------------------------------------------------------------------------
# Codes ↔ bits (bit h has weight 2^h)
# ---------------------------------------------------------------------------------------
@st.composite
def codes_and_bits(draw):
    H = draw(st.integers(1, 30))
    codes = draw(st.lists(st.integers(0, (1 << H) - 1), min_size=1, max_size=16))
    return H, torch.tensor(codes, dtype=torch.long)


@FAST
@given(codes_and_bits())
def test_codes_to_bits_is_the_binary_expansion(hc):
    H, codes = hc
    bits = codes_to_bits(codes, H)
    assert bits.shape == (len(codes), H) and set(bits.unique().tolist()) <= {0.0, 1.0}
    for c, b in zip(codes.tolist(), bits.long().tolist()):
        assert b == [(c >> h) & 1 for h in range(H)]
    back = (bits.long() << torch.arange(H)).sum(-1)  # bits → codes
    assert torch.equal(back, codes)
    if H <= 12:
        assert torch.equal(bit_matrix(H)[codes], bits)


@FAST
@given(st.integers(1, 12), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_sample_codes_sets_exactly_the_bits_whose_uniform_is_below_p(H, n, seed):
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(n, H, generator=g) * 4
    u = torch.rand(n, H, generator=g)
    codes = sample_codes(L, noise=u)
    assert codes.dtype == torch.long and ((0 <= codes) & (codes < (1 << H))).all()
    assert torch.equal(codes_to_bits(codes, H).bool(), u < torch.sigmoid(L))
    # log Q of the drawn code is the sum of its bits' log-probabilities
    p = torch.sigmoid(L.double())
    want = torch.where(u < torch.sigmoid(L), p, 1 - p).log().sum(-1)
    torch.testing.assert_close(log_q(L, codes).double(), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Sampling filters keep exactly the tokens they should, with renormalised softmax mass
# ---------------------------------------------------------------------------------------
@st.composite
def distinct_logits(draw):
    V = draw(st.integers(2, 12))
    xs = draw(st.lists(st.integers(-400, 400), min_size=V, max_size=V, unique=True))
    return torch.tensor(xs, dtype=torch.float32) / 40  # gaps ≥ 0.025: no float32 ties


def _probs_sampled_from(logits, **kw):
    """The probability vector ``sample`` hands to torch.multinomial."""
    with mock.patch("torch.multinomial", wraps=torch.multinomial) as spy:
        sample(logits[None], generator=torch.Generator().manual_seed(0), **kw)
    return spy.call_args.args[0][0].double()


@FAST
@given(distinct_logits(), st.integers(1, 14), st.sampled_from([0.5, 1.0, 2.0]))
def test_top_k_keeps_exactly_the_k_largest(logits, k, temperature):
    probs = _probs_sampled_from(logits, top_k=k, temperature=temperature)
    keep = set(logits.argsort(descending=True)[:k].tolist())
    assert {i for i, p in enumerate(probs.tolist()) if p > 0} == keep
    idx = sorted(keep)
    want = (logits[idx].double() / temperature).softmax(-1)
    torch.testing.assert_close(probs[idx], want, rtol=1e-5, atol=1e-7)


@FAST
@given(distinct_logits(), st.floats(0.01, 1.0), st.sampled_from([0.5, 1.0, 2.0]))
def test_top_p_keeps_the_smallest_prefix_reaching_p(logits, top_p, temperature):
    full = (logits.double() / temperature).softmax(-1)
    order = full.argsort(descending=True).tolist()
    before = 0.0
    keep = set()
    for i in order:  # a token is kept while the mass strictly before it is below top_p
        assume(abs(before - top_p) > 1e-5)  # no decision within float32 rounding
        if before < top_p:
            keep.add(i)
        before += float(full[i])
    probs = _probs_sampled_from(logits, top_p=top_p, temperature=temperature)
    assert {i for i, p in enumerate(probs.tolist()) if p > 0} == keep
    assert (
        math.isclose(float(full[sorted(keep)].sum()), 1.0)
        or float(full[sorted(keep)].sum()) >= top_p - 1e-5
    )
    idx = sorted(keep)
    torch.testing.assert_close(probs[idx], full[idx] / full[idx].sum(), rtol=1e-5, atol=1e-7)
