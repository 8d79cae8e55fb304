"""The synthetic task of Section 4.1: sampler statistics, training stream, parser, scoring,
Figure 4 rendering."""

import struct

import pytest
import torch

from freeformer.data import synthetic as syn
from freeformer.data.synthetic import (
    ALPHABET,
    SEQ_LEN,
    SyntheticBatches,
    decode,
    encode,
    parse,
    random_prompt,
    sample_annotated,
    sample_batch,
    sample_strings,
)
from freeformer.errors import CheckpointError, ConfigError, DataError, UserError
from freeformer.experiments.figure4 import plot_figure4, render_ansi, render_group_ansi
from freeformer.experiments.scoring import aggregate, group_metrics, jaccard

N = 20_000  # samples for the statistical tests: ~0.1 s to draw, ~0.3 s to parse


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def big_sample():
    return sample_annotated(N, gen(1234))


def body_of(letter: str, runs: dict[int, str]) -> str:
    """A valid-length string: prompt ``letter>`` and a body of '_' with ``runs`` written in."""
    body = ["_"] * 64
    for at, text in runs.items():
        body[at : at + len(text)] = text
    assert len(body) == 64
    return f"{letter}>" + "".join(body)


# --------------------------------------------------------------------------- vocabulary


def test_alphabet_and_constants():
    assert ALPHABET == "_!>ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    assert syn.VOCAB_SIZE == 29 and SEQ_LEN == 66 and syn.BODY == 64
    assert syn.TARGET_LEN == 8 and syn.NOISE_P == 1 / 16


def test_encode_decode_roundtrip_and_bad_ids():
    s = "K>__KKKK!KKK__!"
    ids = encode(s)
    assert ids.dtype == torch.long and ids.tolist()[:3] == [ALPHABET.index("K"), 2, 0]
    assert decode(ids) == s
    assert decode([0, 1, 2, 3, 28, 29, -1, 1000]) == "_!>AZ???"
    with pytest.raises(DataError):
        encode("K>a")


# --------------------------------------------------------------------------- sampler


def test_shapes_alphabet_and_prompt(big_sample):
    tok = big_sample.tokens
    assert tok.shape == (N, SEQ_LEN) and tok.dtype == torch.long
    assert int(tok.min()) >= 0 and int(tok.max()) < syn.VOCAB_SIZE
    # Prompt "<letter>>": the letter is the sample's letter and is never noised.
    assert torch.equal(tok[:, 0], big_sample.letter)
    assert bool((tok[:, 0] >= 3).all()) and bool((tok[:, 1] == 2).all())
    # Body holds only '_', '!' and the prompt letter.
    body = tok[:, 2:]
    assert bool(((body == 0) | (body == 1) | (body == tok[:, :1])).all())
    strings = sample_strings(3, gen(0))
    assert all(len(s) == 66 and s[1] == ">" and s[0].isupper() for s in strings)


def test_target_is_eight_letters_before_noise(big_sample):
    tok, start, noise = big_sample.tokens, big_sample.start, big_sample.noise
    body = tok[:, 2:]
    pos = torch.arange(64)
    in_target = (pos >= start[:, None]) & (pos < start[:, None] + 8)
    assert bool((in_target.sum(1) == 8).all())  # the run fits in the body
    assert bool((body == 1).eq(noise).all())  # '!' exactly where noise was drawn
    clean = torch.where(in_target, tok[:, :1], 0)  # the string before noising
    assert torch.equal(torch.where(noise, clean, body), clean)


def test_noise_rate_is_one_sixteenth(big_sample):
    body = big_sample.tokens[:, 2:]
    rate = (body == 1).float().mean().item()
    sd = (1 / 16 * 15 / 16 / body.numel()) ** 0.5  # 2.1e-4
    assert abs(rate - 1 / 16) < 5 * sd
    # Noise is independent of being on the target.
    start = big_sample.start
    pos = torch.arange(64)
    in_target = (pos >= start[:, None]) & (pos < start[:, None] + 8)
    assert abs((body == 1)[in_target].float().mean().item() - 1 / 16) < 0.004


def chi_square(counts: torch.Tensor) -> float:
    expected = counts.sum().item() / counts.numel()
    return ((counts.double() - expected) ** 2 / expected).sum().item()


def test_start_and_letter_are_uniform(big_sample):
    starts = torch.bincount(big_sample.start, minlength=57)
    assert starts.numel() == 57 and int(starts.min()) > 0  # every start in [0, 56] happens
    # df = 56: mean 56, sd 10.6; 110 is p ~ 2e-5, so a real bias (not chance) fails it.
    assert chi_square(starts) < 110
    letters = torch.bincount(big_sample.letter - 3, minlength=26)
    assert letters.numel() == 26 and chi_square(letters) < 65  # df = 25


def test_sampling_is_determined_by_the_generator():
    assert torch.equal(sample_batch(64, gen(7)), sample_batch(64, gen(7)))
    assert not torch.equal(sample_batch(64, gen(7)), sample_batch(64, gen(8)))
    assert sample_strings(5, gen(3)) == [decode(r) for r in sample_batch(5, gen(3))]
    assert random_prompt(gen(5)) == random_prompt(gen(5))
    prompts = {random_prompt(gen(i)) for i in range(200)}
    assert all(len(p) == 2 and p[1] == ">" and p[0].isupper() for p in prompts)
    assert len(prompts) > 20


# --------------------------------------------------------------------------- training stream


def test_batches_shift_shape_and_determinism():
    a = SyntheticBatches(batch_size=8, seed=1)
    b = SyntheticBatches(batch_size=8, seed=1)
    assert a.vocab_size == 29 and a.seq_len == 65
    x, y = a.next_batch()
    assert x.shape == y.shape == (8, 65) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    assert all(parse(decode(torch.cat([xi, yi[-1:]]))).valid for xi, yi in zip(x, y))
    assert torch.equal(b.next_batch()[0], x)
    x2, _ = a.next_batch()
    assert not torch.equal(x, x2)  # steps differ
    assert not torch.equal(SyntheticBatches(8, seed=2).next_batch()[0], x)


def test_resume_gives_the_uninterrupted_batches():
    straight = SyntheticBatches(16, seed=3)
    batches = [straight.next_batch() for _ in range(5)]
    first = SyntheticBatches(16, seed=3)
    for _ in range(2):
        first.next_batch()
    state = first.state_dict()
    assert state == {"step": 2}
    resumed = SyntheticBatches(16, seed=3)
    resumed.load_state_dict(state)
    for x, y in batches[2:]:
        rx, ry = resumed.next_batch()
        assert torch.equal(rx, x) and torch.equal(ry, y)
    with pytest.raises(CheckpointError):
        resumed.load_state_dict({"step": -1})
    with pytest.raises(CheckpointError):
        resumed.load_state_dict({})


def test_rank_sharding_concatenates_to_single_process():
    single = SyntheticBatches(12, seed=4)
    ranks = [SyntheticBatches(12, seed=4, rank=r, world_size=3) for r in range(3)]
    for _ in range(3):
        x, y = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert all(p[0].shape == (4, 65) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
    val = single.fixed_batches(2)
    val_parts = [r.fixed_batches(2) for r in ranks]
    for i in range(2):
        assert torch.equal(torch.cat([vp[i][0] for vp in val_parts]), val[i][0])


def test_bad_stream_config_raises_config_error():
    with pytest.raises(ConfigError, match="divisible"):
        SyntheticBatches(10, seed=0, rank=0, world_size=4)
    with pytest.raises(ConfigError):
        SyntheticBatches(0, seed=0)
    with pytest.raises(ConfigError):
        SyntheticBatches(8, seed=0, rank=2, world_size=2)
    assert issubclass(ConfigError, UserError)


def test_fixed_batches_deterministic_and_disjoint_from_training():
    stream = SyntheticBatches(8, seed=5)
    val = stream.fixed_batches(4)
    again = SyntheticBatches(8, seed=5).fixed_batches(4)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(val, again))
    assert stream.state_dict() == {"step": 0}  # validation does not consume training steps
    train = [stream.next_batch()[0] for _ in range(50)]
    assert not any(torch.equal(v[0], t) for v in val for t in train)
    # Nor does it collide with the training stream of a neighbouring seed.
    other = SyntheticBatches(8, seed=6)
    other_train = [other.next_batch()[0] for _ in range(50)]
    assert not any(torch.equal(v[0], t) for v in val for t in other_train)
    assert len({tuple(v[0].flatten().tolist()) for v in val}) == 4


# --------------------------------------------------------------------------- parser


def test_parse_valid_clean_and_noised():
    p = parse(body_of("K", {5: "KKKKKKKK"}))
    assert (
        p.valid
        and p.letter == "K"
        and p.position == 5
        and p.noise == frozenset()
        and p.reason == ""
    )
    # Noise on the background and on target characters.
    p = parse(body_of("K", {0: "!", 5: "KK!KKKKK", 40: "!"}))
    assert p.valid and p.position == 5 and p.noise == frozenset({0, 7, 40})
    # Target at both ends of the body.
    assert parse(body_of("A", {0: "AAAAAAAA"})).position == 0
    assert parse(body_of("Z", {56: "ZZZZZZZZ"})).position == 56
    # First target character noised: the '_' before it pins the start.
    assert parse(body_of("K", {10: "!KKKKKKK"})).position == 10


def test_parse_ambiguity_takes_smallest_start():
    # True start 10; body[9] and body[17] are noise, so windows 9 and 10 both qualify.
    s = body_of("K", {9: "!", 10: "KKKKKKK!"})
    assert parse(s).position == 9
    # Noise after a fully noised-at-start target: windows 10 and 11 qualify -> 10.
    assert parse(body_of("K", {10: "!KKKKKKK!"})).position == 10
    # Letters near the end of the body: window must still fit (start <= 56).
    assert parse(body_of("K", {55: "!!KKKKKK!"})).position == 55


@pytest.mark.parametrize(
    "s, reason",
    [
        ("K>" + "_" * 63, "bad length"),
        ("K>" + "_" * 65, "bad length"),
        ("", "bad length"),
        (body_of("K", {5: "KKKKKKKK"}).replace("K>", "k>", 1), "bad prompt"),
        ("!" + body_of("K", {5: "KKKKKKKK"})[1:], "bad prompt"),
        ("K_" + body_of("K", {5: "KKKKKKKK"})[2:], "bad prompt"),
        (body_of("K", {5: "KKKKKKKK", 30: "J"}), "foreign character"),  # a different letter
        (body_of("K", {5: "KKKK>KKK"}), "foreign character"),
        (body_of("K", {5: "JJJJJJJJ"}), "foreign character"),
        (body_of("K", {}), "no target"),
        (body_of("K", {5: "!!!!!!!!"}), "no target"),
        (body_of("K", {5: "KKKKKKKKK"}), "target too wide"),  # a run of 9
        (body_of("K", {5: "KKKK", 30: "KKKK"}), "target too wide"),  # two runs
        (body_of("K", {5: "KKK_KKKK"}), "gap in target"),
        (body_of("K", {5: "KKKKKK"}), "target too short"),  # run of 6 in '_'
        (body_of("K", {5: "KKKKKKK"}), "target too short"),  # run of 7 in '_'
        (body_of("K", {59: "!KKKK"}), "target too short"),  # window would start at 58 > 56
    ],
)
def test_parse_invalid_reasons(s, reason):
    p = parse(s)
    assert not p.valid and p.position is None and p.reason == reason
    assert reason in syn.REASONS


def test_parse_invalid_keeps_what_it_can_read():
    p = parse(body_of("K", {5: "KKKKKKKKK", 40: "!"}))
    assert p.letter == "K" and p.noise == frozenset({40})
    assert parse("x" * 66).letter is None


def test_every_sample_parses_to_its_true_position(big_sample):
    tok, start = big_sample.tokens, big_sample.start.tolist()
    body = tok[:, 2:]
    strings = [decode(r) for r in tok]
    agree = 0
    for i, s in enumerate(strings):
        p = parse(s)
        assert p.valid, s
        assert p.letter == s[0]
        assert p.noise == frozenset(torch.nonzero(body[i] == 1).flatten().tolist())
        t = start[i]
        # Unambiguous unless the character just before the target is noise.
        if t == 0 or int(body[i, t - 1]) != 1:
            assert p.position == t, s
        agree += p.position == t
    # Disagreement needs body[t-1] and body[t+7] both noised: about 1/256.
    rate = agree / N
    assert rate >= 0.99
    assert abs(rate - (1 - 1 / 256)) < 0.002


# --------------------------------------------------------------------------- scoring


def test_group_metrics_same_position():
    group = [
        body_of("K", {3: "KKKKKKKK"}),
        body_of("K", {3: "KK!KKKKK"}),
        body_of("K", {3: "KKKKKKKK"}),
    ]
    m = group_metrics(group)
    assert m["validity"] == 1.0 and m["position_agreement"] == 1.0
    assert m["position_abs_diff"] == 0.0
    # Noise sets {}, {5}, {}: pairs J = 0, 1 (both empty), 0.
    assert m["noise_jaccard"] == pytest.approx(1 / 3)
    assert m["n_sequences"] == 3 and m["n_valid"] == 3 and m["n_pairs"] == 3


def test_group_metrics_positions_3_3_10_and_invalid():
    group = [
        body_of("K", {3: "KKKKKKKK", 20: "!", 30: "!"}),
        body_of("K", {3: "KKKKKKKK", 20: "!"}),
        body_of("K", {10: "KKKKKKKK", 30: "!"}),
        body_of("K", {10: "KKKKKKKKKK"}),  # invalid: ignored by the pair metrics
    ]
    m = group_metrics(group)
    assert m["validity"] == 0.75 and m["n_pairs"] == 3
    assert m["position_agreement"] == pytest.approx(1 / 3)
    assert m["position_abs_diff"] == pytest.approx((0 + 7 + 7) / 3)
    assert m["noise_jaccard"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)


def test_group_metrics_fewer_than_two_valid_and_empty():
    m = group_metrics([body_of("K", {3: "KKKKKKKK"}), "K>___"])
    assert m["validity"] == 0.5 and m["n_pairs"] == 0
    assert m["position_agreement"] is None and m["position_abs_diff"] is None
    assert m["noise_jaccard"] is None
    with pytest.raises(DataError):
        group_metrics([])
    assert jaccard(frozenset(), frozenset()) == 1.0
    assert jaccard(frozenset({1, 2}), frozenset({2, 3})) == pytest.approx(1 / 3)


def test_aggregate_is_group_weighted():
    same = [body_of("K", {3: "KKKKKKKK"})] * 4  # 6 pairs, agreement 1
    split = [body_of("K", {3: "KKKKKKKK"}), body_of("K", {9: "KKKKKKKK"})]  # 1 pair, 0
    lonely = [body_of("K", {3: "KKKKKKKK"}), "junk"]  # no pairs
    a = aggregate([same, split, lonely])
    assert a["position_agreement"] == pytest.approx(0.5)  # group mean, not 6/7
    assert a["position_abs_diff"] == pytest.approx(3.0)
    assert a["validity"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert (a["n_groups"], a["n_sequences"], a["n_valid"], a["n_pairs"]) == (3, 8, 7, 7)
    assert a["n_groups_with_pairs"] == 2
    assert aggregate([lonely])["position_agreement"] is None
    with pytest.raises(DataError):
        aggregate([])


def test_independent_samples_agree_only_by_chance():
    strings = sample_strings(2000, gen(9))
    a = aggregate([strings[i : i + 10] for i in range(0, 2000, 10)])
    assert a["validity"] == 1.0
    assert a["position_agreement"] == pytest.approx(1 / 57, abs=0.01)
    assert a["position_abs_diff"] == pytest.approx(19.0, abs=1.0)
    assert a["noise_jaccard"] < 0.06
    groups = [[s] * 5 for s in strings[:20]]  # identical sequences agree perfectly
    b = aggregate(groups)
    assert b["position_agreement"] == 1.0 and b["noise_jaccard"] == 1.0


# --------------------------------------------------------------------------- figure 4


def test_render_ansi():
    s = "K>__KK!"
    out = render_ansi(s, "green")
    assert "\x1b[1;32mK" in out and "\x1b[31m!" in out and "\x1b[2m__" in out
    plain = out
    for code in ("\x1b[1;32m", "\x1b[31m", "\x1b[2m", "\x1b[0m"):
        plain = plain.replace(code, "")
    assert plain == s
    assert "\x1b[1;34m" in render_ansi(s)  # blue by default
    lines = render_group_ansi([s, s], "blue").split("\n")
    assert len(lines) == 2 and lines[0] == render_ansi(s, "blue")
    with pytest.raises(UserError):
        render_group_ansi([s], "red")


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_figure4_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    g = gen(11)
    panels = {
        label: {
            "prompt": "K>",
            "independent": sample_strings(5, g),
            "shared": [sample_strings(5, g), sample_strings(5, g)],
        }
        for label in ("κ = 1/64 bit", "κ = 8 bits")
    }
    panels["κ = 8 bits"]["shared"][1][0] = "K>__KKKKKKKKKKKKK?A"  # malformed output still draws
    path = plot_figure4(panels, tmp_path / "sub" / "fig4.png")
    assert path.exists() and path.stat().st_size > 5_000
    w, h = png_size(path)
    assert 800 < w < 3000 and 600 < h < 4000 and h > w / 2  # two stacked blocks of 17 rows
    one = plot_figure4({"only": panels["κ = 1/64 bit"]}, tmp_path / "one.png", show_text=False)
    assert png_size(one)[1] < h  # one model draws a shorter figure
    with pytest.raises(DataError):
        plot_figure4({"bad": {"independent": ["K>"]}}, tmp_path / "bad.png")
    with pytest.raises(DataError):
        plot_figure4({}, tmp_path / "bad.png")
