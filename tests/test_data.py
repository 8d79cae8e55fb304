"""Tokenizers, shard preparation and the packed-window loader: round-trips, exact token
accounting, atomic output, determinism, resume = uninterrupted, rank sharding."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from freeformer.data.loader import Batches, TokenWindows, load_manifest
from freeformer.data.prepare import count_documents, iter_documents, list_files, prepare
from freeformer.data.tokenizer import (
    EOS_TOKEN,
    ByteTokenizer,
    HFTokenizer,
    build_tokenizer,
    load_tokenizer,
    train_bpe,
)
from freeformer.errors import ConfigError, DataError, UserError

needs_hf = pytest.mark.skipif(
    importlib.util.find_spec("tokenizers") is None, reason="needs freeformer[hf]"
)

WORDS = ["alpha", "beta", "gamma", "délta", "ωmega", "def", "return", "(x)", "→", "\n"]


def random_text(rng: np.random.Generator, n_words: int) -> str:
    return " ".join(rng.choice(WORDS, size=n_words))


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


# -- tokenizers ------------------------------------------------------------------------


def test_byte_tokenizer_round_trip_and_lenient_decode(tmp_path):
    tok = ByteTokenizer()
    text = "héllo wörld ✓ 𝔘 \x00 end"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    # A cut multi-byte character, EOS, and out-of-range ids decode without raising.
    assert tok.decode([0xE2, 0x9C, 256, 999, -1, 65]) == f"\ufffd{EOS_TOKEN}\ufffd\ufffdA"
    assert [a.tolist() for a in tok.encode_batch(["ab", "é"])] == [[97, 98], [195, 169]]
    tok.save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)


@pytest.fixture(scope="module")
def bpe_texts():
    rng = np.random.default_rng(0)
    return [random_text(rng, 200) for _ in range(50)]


@pytest.fixture(scope="module")
def bpe(bpe_texts):
    return train_bpe(bpe_texts, 320)


@needs_hf
def test_bpe_trains_deterministically_and_round_trips(bpe, bpe_texts, tmp_path):
    assert 257 < bpe.vocab_size <= 320
    assert bpe.hf.id_to_token(bpe.eos_id) == EOS_TOKEN
    assert bpe.spec == "bpe:320"
    again = train_bpe(iter(bpe_texts), 320)
    assert again.hf.to_str() == bpe.hf.to_str()
    text = "alpha ωmega → unseen wörds ✓ 𝔘"  # includes characters never seen in training
    ids = bpe.encode(text)
    assert len(ids) < len(text.encode("utf-8"))  # merges actually compress
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text
    # Text containing the EOS string must not produce the EOS id.
    assert bpe.eos_id not in bpe.encode(f"a {EOS_TOKEN} b")
    assert bpe.decode([bpe.eos_id]) == EOS_TOKEN
    assert isinstance(bpe.decode([5, 10_000, -3]), str)

    bpe.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, HFTokenizer)
    assert loaded.hf.to_str() == bpe.hf.to_str()
    assert (loaded.vocab_size, loaded.eos_id, loaded.spec) == (
        bpe.vocab_size,
        bpe.eos_id,
        "bpe:320",
    )
    assert loaded.encode(text) == ids
    assert [a.tolist() for a in loaded.encode_batch([text, "beta"])] == [ids, bpe.encode("beta")]


@needs_hf
def test_tokenizer_json_path_and_added_eos(bpe, tmp_path):
    bpe.hf.save(str(tmp_path / "tokenizer.json"))
    for spec in (str(tmp_path / "tokenizer.json"), str(tmp_path)):
        tok = build_tokenizer(spec, texts=None)
        assert isinstance(tok, HFTokenizer)
        assert tok.encode("gamma def") == bpe.encode("gamma def")
        assert tok.eos_id == bpe.eos_id

    # A foreign tokenizer without <|endoftext|> gets it added as one extra id.
    from tokenizers import Tokenizer, models, pre_tokenizers

    wl = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    wl.save(str(tmp_path / "wl.json"))
    tok = build_tokenizer(str(tmp_path / "wl.json"))
    assert (tok.vocab_size, tok.eos_id) == (4, 3)
    assert tok.encode("a b a") == [1, 2, 1]


def test_tokenizer_spec_errors(tmp_path):
    with pytest.raises(ConfigError) as e:
        build_tokenizer("bpe:abc", texts=lambda: ["x"])
    assert "bpe:abc" in one_line(e)
    with pytest.raises(ConfigError) as e:
        build_tokenizer("bpe:100", texts=lambda: ["x"])
    assert "257" in one_line(e)
    with pytest.raises(DataError) as e:
        build_tokenizer(str(tmp_path / "nope.json"))
    assert "nope.json" in one_line(e)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError) as e:
        build_tokenizer(str(bad))
    assert "bad.json" in one_line(e)
    with pytest.raises(DataError) as e:
        load_tokenizer(tmp_path)
    one_line(e)


# -- prepare -----------------------------------------------------------------------------

JSONL_RECORDS = ["first récord", "second\nrecord with newline", "third ✓"]


def make_corpus(root: Path) -> dict[str, str]:
    """A small tree; returns the documents prepare should take, in order, keyed by origin."""
    rng = np.random.default_rng(1)
    files = {
        "a.py": "def f(x):\n    return x\n",
        "b.py": random_text(rng, 300),
        "notes.txt": "plain text, ünïcode ✓\n",
        "readme.md": "not included\n",
        "sub/c.py": random_text(rng, 150),
        "sub/deep/d.py": "# deep\n",
        "build/junk.py": "excluded by directory\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(JSONL_RECORDS)]
    (root / "data.jsonl").write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")
    docs = {rel: files[rel] for rel in ["a.py", "b.py"]}
    docs.update({f"data.jsonl:{i}": t for i, t in enumerate(JSONL_RECORDS)})
    docs.update({rel: files[rel] for rel in ["notes.txt", "sub/c.py", "sub/deep/d.py"]})
    return docs


INCLUDE = ["*.py", "*.txt", "*.jsonl"]


def read_split(out: Path, manifest: dict, split: str) -> np.ndarray:
    parts = [np.fromfile(out / s["file"], dtype="<u2") for s in manifest[split]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype="<u2")


def split_docs(stream: np.ndarray, eos: int) -> list[str]:
    assert len(stream) == 0 or stream[-1] == eos
    cuts = np.flatnonzero(stream == eos)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [bytes(stream[s:c].astype(np.uint8)).decode("utf-8") for s, c in zip(starts, cuts)]


def test_list_files_globs_and_order(tmp_path):
    make_corpus(tmp_path)
    files = list_files([tmp_path], INCLUDE, exclude=["build"])
    rels = [f.relative_to(tmp_path).as_posix() for f in files]
    assert rels == ["a.py", "b.py", "data.jsonl", "notes.txt", "sub/c.py", "sub/deep/d.py"]
    # "*" crosses "/", globs also match bare names; explicit files bypass include.
    assert [f.name for f in list_files([tmp_path / "sub"], ["deep/*"])] == ["d.py"]
    explicit = list_files([tmp_path / "readme.md", tmp_path], ["*.txt"])
    assert [f.name for f in explicit] == ["readme.md", "notes.txt"]
    assert count_documents(files) == 8


def test_prepare_manifest_tokens_and_partition(tmp_path):
    src = tmp_path / "src"
    docs = make_corpus(src)
    out = tmp_path / "data"
    m = prepare(
        [src],
        out,
        include=INCLUDE,
        exclude=["build"],
        val_fraction=0.3,
        seed=3,
        show_progress=False,
    )
    texts = list(docs.values())
    assert m == load_manifest(out)
    assert (m["format"], m["tokenizer"], m["vocab_size"], m["eos_id"], m["dtype"]) == (
        1,
        "byte",
        257,
        256,
        "uint16",
    )
    assert (m["n_documents"], m["n_val_documents"], m["val_split"]) == (8, 2, "documents")
    assert m["train_tokens"] + m["val_tokens"] == sum(len(t.encode()) + 1 for t in texts)
    for split in ("train", "val"):
        for s in m[split]:
            assert (out / s["file"]).stat().st_size == 2 * s["tokens"]
    train = split_docs(read_split(out, m, "train"), 256)
    val = split_docs(read_split(out, m, "val"), 256)
    assert len(val) == 2
    assert sorted(train + val) == sorted(texts)  # a partition of whole documents
    assert train == [t for t in texts if t not in val]  # original order kept
    assert isinstance(load_tokenizer(out), ByteTokenizer)
    assert not list(tmp_path.glob(".data*"))  # no temp dir left behind

    # Same seed: identical bytes; shard size does not change the streams.
    m2 = prepare(
        [src],
        tmp_path / "d2",
        include=INCLUDE,
        exclude=["build"],
        val_fraction=0.3,
        seed=3,
        shard_tokens=97,
        show_progress=False,
    )
    assert len(m2["train"]) > 1 and all(s["tokens"] <= 97 for s in m2["train"])
    for split in ("train", "val"):
        assert np.array_equal(read_split(out, m, split), read_split(tmp_path / "d2", m2, split))


def test_prepare_single_document_and_no_val(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("x" * 999)
    m = prepare([f], tmp_path / "a", val_fraction=0.1, show_progress=False)
    assert m["val_split"] == "tail" and (m["train_tokens"], m["val_tokens"]) == (900, 100)
    stream = np.concatenate([read_split(tmp_path / "a", m, s) for s in ("train", "val")])
    assert split_docs(stream, 256) == ["x" * 999]

    m = prepare([f], tmp_path / "b", val_fraction=0.0, show_progress=False)
    assert (m["val"], m["val_tokens"], m["val_split"]) == ([], 0, "none")
    with pytest.raises(DataError) as e:
        TokenWindows(tmp_path / "b", "val", 8, 2, seed=0)
    assert "val_fraction=0" in one_line(e)


@needs_hf
def test_prepare_with_bpe_matches_saved_tokenizer(tmp_path):
    src = tmp_path / "src"
    docs = make_corpus(src)
    out = tmp_path / "data"
    m = prepare(
        [src],
        out,
        tokenizer="bpe:300",
        include=INCLUDE,
        exclude=["build"],
        val_fraction=0.0,
        show_progress=False,
    )
    tok = load_tokenizer(out)
    assert m["tokenizer"] == "bpe:300" and m["vocab_size"] == tok.vocab_size
    expected = np.concatenate([np.append(tok.encode(t), tok.eos_id) for t in docs.values()])
    assert np.array_equal(read_split(out, m, "train"), expected)
    # A malformed record met while training the BPE is still a one-line DataError.
    (src / "zz.jsonl").write_text('{"text": broken\n')
    with pytest.raises(DataError) as e:
        prepare([src], tmp_path / "d2", tokenizer="bpe:300", show_progress=False)
    assert "zz.jsonl:1" in one_line(e)


def test_prepare_errors_are_one_line_data_errors(tmp_path):
    src = tmp_path / "src"
    make_corpus(src)
    out = tmp_path / "out"

    def fails(match, sources=(src,), exc=DataError, **kw):
        kw.setdefault("include", INCLUDE)
        with pytest.raises(exc) as e:
            prepare(list(sources), out, show_progress=False, **kw)
        assert match in one_line(e)
        assert isinstance(e.value, UserError)
        assert not out.exists()

    fails("no sources", sources=())
    fails("missing_dir", sources=(src, tmp_path / "missing_dir"))
    fails("matched", include=["*.rs"])
    fails("[0, 1)", val_fraction=1.0)
    fails("[0, 1)", val_fraction=-0.1)
    fails("bpe:abc", exc=ConfigError, tokenizer="bpe:abc")
    fails("nope.json", tokenizer=str(tmp_path / "nope.json"))
    fails("'body'", jsonl_field="body")  # the JSONL records have no such field
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "e.txt").write_text("")
    (empty / "blank.jsonl").write_text("\n\n")
    fails("empty corpus", sources=(empty,))
    fails("empty corpus", sources=(empty / "blank.jsonl",))


def test_prepare_is_atomic_and_refuses_non_empty_out(tmp_path):
    src = tmp_path / "src"
    make_corpus(src)
    # A malformed record at the end fails after earlier documents were written.
    (src / "zz.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    out = tmp_path / "out"
    with pytest.raises(DataError) as e:
        prepare([src], out, include=INCLUDE, show_progress=False)
    assert "zz.jsonl:2" in one_line(e)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing half-written

    good = prepare([src], out, include=["*.py"], show_progress=False)
    with pytest.raises(DataError) as e:
        prepare([src], out, include=["*.py"], show_progress=False)
    assert "--overwrite" in one_line(e)
    # A failing overwrite keeps the old output intact.
    with pytest.raises(DataError):
        prepare([src], out, include=INCLUDE, overwrite=True, show_progress=False)
    assert load_manifest(out) == good
    again = prepare([src], out, include=["*.txt"], overwrite=True, show_progress=False)
    assert load_manifest(out) == again and again["n_documents"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_iter_documents_jsonl(tmp_path):
    make_corpus(tmp_path)
    got = [t for t, _ in iter_documents([tmp_path / "data.jsonl"])]
    assert got == JSONL_RECORDS


# -- loader ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    rng = np.random.default_rng(7)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz .,"))
    for i in range(40):
        n = int(rng.integers(50, 400))
        (root / "src").mkdir(exist_ok=True)
        (root / "src" / f"doc{i:02d}.txt").write_text("".join(rng.choice(letters, size=n)))
    # Small shards so that many windows cross shard boundaries.
    prepare(
        [root / "src"],
        root / "data",
        val_fraction=0.25,
        shard_tokens=500,
        seed=0,
        show_progress=False,
    )
    return root / "data"


def stream_of(data_dir: Path, split: str) -> bytes:
    return read_split(data_dir, load_manifest(data_dir), split).tobytes()


def window_starts(stream: bytes, x: torch.Tensor, y: torch.Tensor) -> list[int]:
    """Where each row of (x, y[:, -1]) occurs in the stream (asserting that it does)."""
    starts = []
    for row in torch.cat([x, y[:, -1:]], dim=1):
        needle = row.numpy().astype("<u2").tobytes()
        pos = stream.find(needle)
        while pos >= 0 and pos % 2:  # a match must be token-aligned
            pos = stream.find(needle, pos + 1)
        assert pos >= 0, "window not found in the stream"
        starts.append(pos // 2)
    return starts


def test_windows_are_real_shifted_windows(data_dir):
    w = TokenWindows(data_dir, "train", seq_len=32, batch_size=8, seed=0)
    assert isinstance(w, Batches)
    stream = stream_of(data_dir, "train")
    assert w.n_tokens == len(stream) // 2 and len(w.manifest["train"]) > 5
    for _ in range(5):
        x, y = w.next_batch()
        assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])
        window_starts(stream, x, y)
    assert w.state_dict()["step"] == 5


def test_windows_deterministic_by_seed_and_resumable(data_dir):
    def batches(seed, n):
        w = TokenWindows(data_dir, "train", 16, 4, seed=seed)
        return [w.next_batch() for _ in range(n)]

    a, b, c = batches(0, 5), batches(0, 5), batches(1, 5)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))
    assert not torch.equal(a[0][0], a[1][0])  # steps differ

    first = TokenWindows(data_dir, "train", 16, 4, seed=0)
    for _ in range(3):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = TokenWindows(data_dir, "train", 16, 4, seed=0)
    resumed.load_state_dict(state)
    x, y = resumed.next_batch()
    assert torch.equal(x, a[3][0]) and torch.equal(y, a[3][1])
    assert torch.equal(first.next_batch()[0], x)

    with pytest.raises(DataError) as e:
        TokenWindows(data_dir, "train", 16, 4, seed=5).load_state_dict(state)
    assert "seed" in one_line(e)


def test_rank_sharding_equals_single_process(data_dir):
    single = TokenWindows(data_dir, "train", 16, 6, seed=2)
    ranks = [TokenWindows(data_dir, "train", 16, 6, seed=2, rank=r, world_size=3) for r in range(3)]
    for _ in range(4):
        x, y = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert all(p[0].shape == (2, 16) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
    # Resuming on a different world size continues the same global stream.
    r1 = TokenWindows(data_dir, "train", 16, 6, seed=2, rank=1, world_size=2)
    r1.load_state_dict(single.state_dict())
    assert torch.equal(r1.next_batch()[0], single.next_batch()[0][3:6])
    fixed = single.fixed_batches(2)
    fixed_parts = [r.fixed_batches(2) for r in ranks]
    for i in range(2):
        assert torch.equal(torch.cat([p[i][0] for p in fixed_parts]), fixed[i][0])

    with pytest.raises(ConfigError) as e:
        TokenWindows(data_dir, "train", 16, 5, seed=0, rank=0, world_size=2)
    assert "divisible" in one_line(e)


def test_fixed_batches_deterministic_and_non_overlapping(data_dir):
    v = TokenWindows(data_dir, "val", seq_len=16, batch_size=4, seed=0)
    first = v.fixed_batches(3)
    v.next_batch()
    v.next_batch()
    again = TokenWindows(data_dir, "val", 16, 4, seed=9).fixed_batches(3)
    assert len(first) == 3
    for (x1, y1), (x2, y2), (x3, y3) in zip(first, v.fixed_batches(3), again):
        assert torch.equal(x1, x2) and torch.equal(x1, x3)
        assert torch.equal(y1, y2) and torch.equal(y1, y3)
    stream = stream_of(data_dir, "val")
    starts = sorted(s for x, y in first for s in window_starts(stream, x, y))
    assert len(starts) == 12 and min(np.diff(starts)) >= 17
    # Asking for more than fit returns every non-overlapping batch there is.
    many = v.fixed_batches(10_000)
    assert len(many) == v.max_fixed_batches() == (v.n_tokens // 17) // 4


def test_loader_errors(data_dir, tmp_path):
    with pytest.raises(DataError) as e:
        TokenWindows(data_dir, "val", seq_len=100_000, batch_size=2, seed=0)
    assert "smaller seq_len" in one_line(e)
    with pytest.raises(DataError) as e:
        load_manifest(tmp_path)
    assert "manifest.json" in one_line(e)

    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["vocab_size"] = 100  # letters are >= 100 in bytes
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError) as e:
        TokenWindows(copy, "train", 8, 2, seed=0)
    assert "vocab_size 100" in one_line(e)
    shard = copy / m["train"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError) as e:
        load_manifest(copy)
    assert shard.name in one_line(e)
    shard.unlink()
    with pytest.raises(DataError) as e:
        load_manifest(copy)
    assert "missing" in one_line(e)
