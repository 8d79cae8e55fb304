"""Turn text files, directories and JSONL into memory-mapped token shards.

Layout of a prepared data directory::

    manifest.json            what is below, and how it was made
    train_000.bin, ...       raw little-endian uint16 (vocab <= 65536) or uint32 token ids
    val_000.bin, ...
    tokenizer_config.json    (+ tokenizer.json for Hugging Face tokenizers)

Each file, or each record of a ``.jsonl`` file, is one document; every document is followed
by the tokenizer's EOS id (and preceded by BOS when the tokenizer is a converted model's
whose source adds one), and the documents of a split are concatenated into one stream
cut into shards of ``shard_tokens`` ids (a document may straddle two shards: readers treat
the shards of a split as a single stream).

Validation split rule (deterministic in ``seed``):

* ``val_fraction == 0``: no validation split.
* two or more documents: ``round(val_fraction * n)`` whole documents, at least 1 and at
  most ``n - 1``, drawn without replacement by ``np.random.default_rng(seed)``; the others,
  in their original order, form the training split. Whole documents, so that validation
  text never leaks into training through a shared document.
* a single document: its token stream (EOS included) is cut, and the last
  ``round(val_fraction * tokens)`` ids (at least 1, at most ``tokens - 1``) go to
  validation, so that validation is never empty.

The output is written into a temporary directory beside ``out_dir`` and renamed into
place at the end, so a failure or interruption leaves no half-written ``out_dir``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from freeformer.data.tokenizer import Tokenizer, build_tokenizer
from freeformer.errors import ConfigError, DataError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# Documents are tokenized in groups so a Hugging Face tokenizer can encode them in parallel.
_CHUNK_BYTES = 1 << 22
_CHUNK_DOCS = 512


def list_files(
    sources: Sequence[str | Path],
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    skip: Sequence[str | Path] = (),
) -> list[Path]:
    """The files named by ``sources``, in a deterministic order.

    A file source is always taken. A directory is walked recursively and a file is taken if
    some ``include`` glob and no ``exclude`` glob matches its path relative to that
    directory or its bare name (``fnmatch``, case-sensitive; ``*`` also matches ``/``);
    subdirectories matching an ``exclude`` glob are not entered, nor are ``skip`` paths
    (``prepare`` skips its own output). Files come sorted by relative path per source, in
    source order, each file once.
    """
    if not sources:
        raise DataError("no sources given; pass at least one file or directory to prepare")
    skipped = {Path(p).resolve() for p in skip}
    seen: set[Path] = set()
    files: list[Path] = []

    def take(p: Path) -> None:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            files.append(p)

    for src in sources:
        src = Path(src).expanduser()
        if src.is_file():
            take(src)
            continue
        if not src.is_dir():
            raise DataError(
                f"source {str(src)!r} does not exist; give existing files or directories"
            )
        found: list[tuple[str, Path]] = []
        for root, dirs, names in os.walk(src):
            root_p = Path(root)
            rel_root = root_p.relative_to(src)
            dirs[:] = [
                d
                for d in dirs
                if not _matches((rel_root / d).as_posix(), d, exclude)
                and (root_p / d).resolve() not in skipped
            ]
            for name in names:
                rel = (rel_root / name).as_posix()
                if _matches(rel, name, include) and not _matches(rel, name, exclude):
                    found.append((rel, root_p / name))
        for _, p in sorted(found):
            take(p)
    if not files:
        raise DataError(
            f"no files under {[str(s) for s in sources]} matched include={list(include)} "
            f"exclude={list(exclude)}; check the --include globs"
        )
    return files


def _matches(rel: str, name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() == ".jsonl"


def iter_documents(files: Sequence[Path], jsonl_field: str = "text") -> Iterator[tuple[str, int]]:
    """Yield ``(text, n_bytes_read)`` per document: a whole file, or one JSONL record.

    Text is decoded as UTF-8 with invalid bytes replaced (U+FFFD), so one bad byte does
    not stop a large run. Blank JSONL lines are skipped; any other line must be a JSON
    object whose ``jsonl_field`` is a string.
    """
    for path in files:
        if not _is_jsonl(path):
            raw = _read_bytes(path)
            yield raw.decode("utf-8", errors="replace"), len(raw)
            continue
        with _open(path) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line.decode("utf-8", errors="replace"))
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path}:{lineno}: invalid JSON ({e.msg}); each line must be a JSON "
                        f"object with a {jsonl_field!r} string field"
                    ) from None
                text = rec.get(jsonl_field) if isinstance(rec, dict) else None
                if not isinstance(text, str):
                    raise DataError(
                        f"{path}:{lineno}: no string field {jsonl_field!r}; set the JSONL field "
                        "name (--jsonl-field) or fix the record"
                    )
                yield text, len(line)


def count_documents(files: Sequence[Path]) -> int:
    """How many documents :func:`iter_documents` will yield (JSONL lines are not parsed)."""
    n = 0
    for path in files:
        if not _is_jsonl(path):
            n += 1
            continue
        with _open(path) as f:
            n += sum(1 for line in f if line.strip())
    return n


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}; check the file permissions") from None


def _open(path: Path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}; check the file permissions") from None


class _ShardWriter:
    """Appends token arrays to ``{split}_000.bin``, ``{split}_001.bin``, ... in a directory,
    starting a new shard every ``shard_tokens`` ids."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory = directory
        self.split = split
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.total = 0
        self._f = None
        self._n = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        self.total += len(tokens)
        while len(tokens):
            if self._f is None:
                name = f"{self.split}_{len(self.shards):03d}.bin"
                self._f = open(self.directory / name, "wb", buffering=1 << 20)
                self.shards.append({"file": name, "tokens": 0})
                self._n = 0
            piece = tokens[: self.shard_tokens - self._n]
            self._f.write(piece.tobytes())
            self._n += len(piece)
            self.shards[-1]["tokens"] = self._n
            tokens = tokens[len(piece) :]
            if self._n == self.shard_tokens:
                self.close()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _validate_args(val_fraction: float, shard_tokens: int, jsonl_field: str) -> None:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
        raise DataError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} is not in [0, 1); use e.g. 0.005")
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ConfigError(f"shard_tokens must be a positive int, got {shard_tokens!r}")
    if not isinstance(jsonl_field, str) or not jsonl_field:
        raise ConfigError(f"jsonl_field must be a non-empty string, got {jsonl_field!r}")


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(
            f"output directory {out} is not empty; pass --overwrite or choose another --out"
        )


def _commit(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``, replacing an old ``out`` only at the very end."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    os.replace(out, old / "d")
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def prepare(
    sources: Sequence[str | Path],
    out_dir: str | Path,
    *,
    tokenizer: str | Tokenizer = "byte",
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    jsonl_field: str = "text",
    val_fraction: float = 0.005,
    seed: int = 0,
    shard_tokens: int = 2**26,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Tokenize ``sources`` into train/val token shards in ``out_dir``; return the manifest.

    ``sources`` are files or directories (see :func:`list_files` for ``include`` /
    ``exclude``); ``.jsonl`` files give one document per line, read from ``jsonl_field``.
    ``tokenizer`` is ``"byte"``, ``"bpe:VOCAB"`` (trained here on the same documents), the
    path of a ``tokenizer.json``, or a :class:`Tokenizer`. ``out_dir`` must be absent or
    empty unless ``overwrite``; it is replaced only once everything is written.
    See the module docstring for the layout and the validation split rule.
    """
    _validate_args(val_fraction, shard_tokens, jsonl_field)
    out = Path(out_dir).expanduser().absolute()
    _check_out_dir(out, overwrite)
    files = list_files(sources, include, exclude, skip=[out])
    n_docs = count_documents(files)
    if n_docs == 0:
        raise DataError(f"empty corpus: the {len(files)} matched file(s) hold no documents")

    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    else:
        tok = build_tokenizer(
            tokenizer, texts=lambda: (text for text, _ in iter_documents(files, jsonl_field))
        )
    if tok.vocab_size <= 2**16:
        dtype, dtype_name = np.dtype("<u2"), "uint16"
    elif tok.vocab_size <= 2**32:
        dtype, dtype_name = np.dtype("<u4"), "uint32"
    else:
        raise DataError(f"vocab_size={tok.vocab_size} does not fit in uint32 token shards")

    # Which documents go to validation (module docstring: "Validation split rule").
    is_val = np.zeros(n_docs, dtype=bool)
    if val_fraction > 0 and n_docs >= 2:
        n_val = min(n_docs - 1, max(1, round(val_fraction * n_docs)))
        is_val[np.random.default_rng(seed).choice(n_docs, size=n_val, replace=False)] = True
    split_rule = "none" if val_fraction == 0 else ("documents" if n_docs >= 2 else "tail")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        train = _ShardWriter(tmp, "train", dtype, shard_tokens)
        val = _ShardWriter(tmp, "val", dtype, shard_tokens)
        eos = np.array([tok.eos_id], dtype=dtype)
        # A converted model's tokenizer whose source starts every text with BOS (Llama):
        # documents start with it too, as the source saw them in pretraining.
        bos = np.array([tok.bos_id] if tok.add_bos and tok.bos_id is not None else [], dtype=dtype)
        total_bytes = sum(f.stat().st_size for f in files)
        content_tokens = 0
        n_seen = 0
        with tqdm(
            total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=not show_progress
        ) as bar:
            try:
                for chunk in _chunks(iter_documents(files, jsonl_field)):
                    encoded = tok.encode_batch([text for text, _ in chunk])
                    for (_, nbytes), ids in zip(chunk, encoded):
                        if n_seen >= n_docs:
                            raise DataError("sources changed while preparing; re-run prepare")
                        content_tokens += len(ids)
                        doc = np.concatenate([bos, ids.astype(dtype, copy=False), eos])
                        if split_rule == "tail":
                            k = min(len(doc) - 1, max(1, round(val_fraction * len(doc))))
                            train.write(doc[: len(doc) - k])
                            val.write(doc[len(doc) - k :])
                        else:
                            (val if is_val[n_seen] else train).write(doc)
                        n_seen += 1
                        bar.update(nbytes)
                        bar.set_postfix(tokens=train.total + val.total, refresh=False)
            finally:
                train.close()
                val.close()
        if n_seen != n_docs:
            raise DataError("sources changed while preparing; re-run prepare")
        if content_tokens == 0:
            raise DataError(
                f"empty corpus: the {n_docs} document(s) in {len(files)} file(s) are all empty"
            )
        tok.save(tmp)
        manifest = {
            "format": FORMAT_VERSION,
            "tokenizer": tok.spec,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "dtype": dtype_name,
            "train": train.shards,
            "val": val.shards,
            "train_tokens": train.total,
            "val_tokens": val.total,
            "n_documents": n_docs,
            "n_val_documents": int(is_val.sum()),
            "n_files": len(files),
            "val_split": split_rule,
            "val_fraction": val_fraction,
            "seed": seed,
            "shard_tokens": shard_tokens,
            "sources": [str(s) for s in sources],
            "include": list(include),
            "exclude": list(exclude),
            "jsonl_field": jsonl_field,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _chunks(docs: Iterator[tuple[str, int]]) -> Iterator[list[tuple[str, int]]]:
    chunk: list[tuple[str, int]] = []
    size = 0
    for doc in docs:
        chunk.append(doc)
        size += doc[1]
        if size >= _CHUNK_BYTES or len(chunk) >= _CHUNK_DOCS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def ensure_stdlib_data(path: str) -> str:
    """Prepare Python's own standard library source (byte tokenizer) into ``path`` once
    (``data.source = "stdlib"``)."""
    if (Path(path) / "manifest.json").is_file():
        return path
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    prepare(
        [stdlib],
        path,
        tokenizer="byte",
        include=("*.py",),
        exclude=("site-packages", "dist-packages", "test", "tests", "idlelib"),
        val_fraction=0.01,
        seed=0,
    )
    return path
