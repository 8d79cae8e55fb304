"""Tokenizers: built-in bytes, locally trained byte-level BPE, or any ``tokenizer.json``.

Every tokenizer maps text to ids in ``[0, vocab_size)`` and owns one end-of-text id
(``eos_id``) that :mod:`freeformer.data.prepare` appends after every document, so packed
training windows see document boundaries. A tokenizer is saved next to the data it
produced (and later next to a run's checkpoints) as

* ``tokenizer_config.json`` -- ``{"type": "byte" | "hf", "spec": ..., "eos_token": ...}``
* ``tokenizer.json`` -- the Hugging Face tokenizer, for ``"hf"`` only,

A pretrained model's tokenizer (``freeformer convert``) is an ``"hf"`` tokenizer with
``"pretrained": true`` and the source's conventions recorded beside ``eos_token``:
``bos_token``, ``add_bos`` (whether the source prepends BOS to a prompt), the chat template,
and special-token parsing as the source does it (``"<|im_end|>"`` in text is that token),
so ids equal the source's; nothing is added to its vocabulary.

and :func:`load_tokenizer` restores it from that directory. The byte tokenizer needs no
files nor extra packages; Hugging Face ``tokenizers`` is imported only when a BPE or a
``tokenizer.json`` is asked for.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from freeformer.errors import ConfigError, DataError, UserError

EOS_TOKEN = "<|endoftext|>"
CONFIG_FILE = "tokenizer_config.json"
HF_FILE = "tokenizer.json"
# Below this a byte-level BPE cannot hold its 256 byte symbols plus the EOS token.
MIN_BPE_VOCAB = 257


class Tokenizer(ABC):
    """What the rest of freeformer needs from a tokenizer.

    ``spec`` records where the tokenizer came from (``"byte"``, ``"bpe:4096"`` or the path
    of a ``tokenizer.json``); it is provenance for manifests and logs, not a way to rebuild
    it -- the saved files are.
    """

    vocab_size: int
    eos_id: int
    spec: str
    bos_id: int | None = None
    """The source's beginning-of-sequence id (pretrained tokenizers), else None."""
    add_bos: bool = False
    """Whether a prompt starts with ``bos_id``, as the source tokenizer encodes it."""
    chat_template: str | None = None
    """The source's Jinja chat template (pretrained tokenizers), kept verbatim."""

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a prompt as the source model expects it: BOS first when it adds one."""
        ids = self.encode(text)
        return [self.bos_id, *ids] if self.add_bos and self.bos_id is not None else ids

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The source's chat template rendered for ``messages`` ([{"role", "content"}]).

        Rendered the way transformers renders it (a sandboxed Jinja environment with
        trim_blocks and lstrip_blocks, bos_token / eos_token defined); the text already
        holds any BOS the template wants, so encode it with :meth:`encode`.
        """
        if self.chat_template is None:
            raise UserError(f"{self.spec}: this tokenizer has no chat template")
        try:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:  # pragma: no cover - jinja2 comes with torch
            raise UserError("chat templates need jinja2: pip install jinja2") from None

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=getattr(self, "bos_token", None) or "",
                eos_token=getattr(self, "eos_token", None) or "",
            )
        except TemplateError as e:
            raise UserError(f"the chat template failed: {e}") from None

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of ``text``, without any BOS/EOS added."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; bytes that are not valid UTF-8 become U+FFFD instead of raising,
        because sampled ids can end in the middle of a character."""

    @abstractmethod
    def save(self, directory: str | Path) -> None:
        """Write the files :func:`load_tokenizer` reads back into ``directory``."""

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode several documents at once (the HF tokenizer parallelises this)."""
        return [np.asarray(self.encode(t), dtype=np.int64) for t in texts]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """Ids 0..255 are the UTF-8 bytes of the text and 256 is EOS.

    The default because it needs no training, no files and no dependency, and every string
    round-trips exactly.
    """

    vocab_size = 257
    eos_id = 256
    spec = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # np.frombuffer avoids building a Python int per byte: ~50x faster on large corpora.
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf.clear()
            # EOS is shown the way a BPE tokenizer shows it, so samples read the same.
            out.append(EOS_TOKEN if i == self.eos_id else "\ufffd")
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _write_json(directory / CONFIG_FILE, {"type": "byte", "spec": self.spec})


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise UserError(
            "this tokenizer needs Hugging Face tokenizers: pip install 'freeformer[hf]'"
        ) from None
    return tokenizers


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` with a guaranteed EOS token.

    For data freeformer tokenizes itself (``pretrained=False``) EOS is ``<|endoftext|>``; if
    the vocabulary lacks it, it is added as a special token (one extra id), because
    documents must be separable in the packed stream, and special-token text in documents
    stays plain text. A pretrained model's tokenizer (``pretrained=True``) is used exactly
    as its source: ``eos_token`` must exist, nothing is added, special tokens in text are
    parsed (chat templates rely on it).
    """

    def __init__(
        self,
        tokenizer: Any,
        spec: str = "hf",
        *,
        pretrained: bool = False,
        eos_token: str = EOS_TOKEN,
        bos_token: str | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
    ) -> None:
        eos = tokenizer.token_to_id(eos_token)
        if eos is None:
            if pretrained:
                raise DataError(f"the tokenizer has no EOS token {eos_token!r} in its vocabulary")
            tokenizer.add_special_tokens([eos_token])
            eos = tokenizer.token_to_id(eos_token)
        bos = None
        if bos_token is not None:
            bos = tokenizer.token_to_id(bos_token)
            if bos is None:
                raise DataError(f"the tokenizer has no BOS token {bos_token!r} in its vocabulary")
        if add_bos and bos is None:
            raise DataError("add_bos is set but the tokenizer names no bos_token")
        # Text that happens to contain "<|endoftext|>" must not forge a document boundary;
        # a pretrained tokenizer parses special tokens as its source does.
        if hasattr(tokenizer, "encode_special_tokens"):
            tokenizer.encode_special_tokens = not pretrained
        self._tok = tokenizer
        self.spec = spec
        self.pretrained = pretrained
        self.eos_token, self.bos_token = eos_token, bos_token
        self.eos_id = int(eos)
        self.bos_id = None if bos is None else int(bos)
        self.add_bos = bool(add_bos)
        self.chat_template = chat_template
        # max id + 1 rather than the vocab length: ids may be sparse in a foreign file.
        self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    @classmethod
    def from_file(cls, path: str | Path, spec: str | None = None, **options: Any) -> HFTokenizer:
        tokenizers = _import_tokenizers()
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer file {path} does not exist; give a tokenizer.json path")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(
                f"{path} is not a valid Hugging Face tokenizer.json ({first}); "
                "give a file saved by tokenizers.Tokenizer.save"
            ) from None
        return cls(tok, spec=spec if spec is not None else str(path), **options)

    @property
    def hf(self) -> Any:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: no post-processor BOS/EOS; prepare adds EOS itself.
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self._tok.decode(ids, skip_special_tokens=False)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / HF_FILE))
        cfg: dict[str, Any] = {"type": "hf", "spec": self.spec, "eos_token": self.eos_token}
        if self.pretrained:
            cfg.update(
                pretrained=True,
                bos_token=self.bos_token,
                add_bos=self.add_bos,
                chat_template=self.chat_template,
                eos_id=self.eos_id,
                bos_id=self.bos_id,
            )
        _write_json(directory / CONFIG_FILE, cfg)


def train_bpe(texts: Iterable[str], vocab_size: int, *, spec: str | None = None) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style) on ``texts`` locally.

    The 256 byte symbols are always in the alphabet, so any text encodes without unknown
    tokens even if the training corpus never contained some byte. Training is
    deterministic: the same texts give the same merges. The result may hold fewer than
    ``vocab_size`` ids when the corpus has too few distinct pairs to merge.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ConfigError(f"BPE vocab_size must be an int, got {vocab_size!r}")
    if vocab_size < MIN_BPE_VOCAB:
        raise ConfigError(
            f"BPE vocab_size={vocab_size} is too small; use at least {MIN_BPE_VOCAB} "
            "(256 byte symbols + <|endoftext|>)"
        )
    tokenizers = _import_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter(texts), trainer=trainer)
    return HFTokenizer(tok, spec=spec if spec is not None else f"bpe:{vocab_size}")


def build_tokenizer(spec: str, texts: Callable[[], Iterable[str]] | None = None) -> Tokenizer:
    """Make the tokenizer named by ``spec`` (the ``--tokenizer`` flag).

    ``"byte"``: :class:`ByteTokenizer`. ``"bpe:VOCAB"``: a byte-level BPE of VOCAB ids
    trained on ``texts()`` (a callable, so the corpus is streamed rather than held).
    Anything else: the path of a ``tokenizer.json`` (or of a directory holding one).
    """
    spec = str(spec).strip()
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("bpe:"):
        raw = spec[4:]
        try:
            vocab = int(raw)
        except ValueError:
            raise ConfigError(
                f"tokenizer {spec!r}: VOCAB must be an integer, e.g. --tokenizer bpe:8192"
            ) from None
        if texts is None:
            raise ConfigError(f"tokenizer {spec!r} must be trained: pass the corpus texts")
        return train_bpe(texts(), vocab, spec=spec)
    path = Path(spec).expanduser()
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        # A directory freeformer wrote (prepared data, a run's or a converted model's
        # tokenizer/): restore it with its recorded EOS/BOS conventions.
        return load_tokenizer(path)
    if path.is_dir():
        path = path / HF_FILE
    if not path.exists():
        raise DataError(
            f"tokenizer {spec!r} is not 'byte', 'bpe:VOCAB', nor an existing tokenizer.json"
        )
    return HFTokenizer.from_file(path, spec=spec)


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Restore the tokenizer that :meth:`Tokenizer.save` wrote into ``directory``."""
    directory = Path(directory)
    cfg_path = directory / CONFIG_FILE
    if not cfg_path.is_file():
        raise DataError(
            f"no {CONFIG_FILE} in {directory}; point to a directory written by freeformer prepare"
        )
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {cfg_path}: {e}; re-run freeformer prepare") from None
    kind = cfg.get("type") if isinstance(cfg, dict) else None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        if not cfg.get("pretrained"):
            return HFTokenizer.from_file(directory / HF_FILE, spec=cfg.get("spec", "hf"))
        try:
            tok = HFTokenizer.from_file(
                directory / HF_FILE,
                spec=cfg.get("spec", "hf"),
                pretrained=True,
                eos_token=cfg["eos_token"],
                bos_token=cfg.get("bos_token"),
                add_bos=bool(cfg.get("add_bos", False)),
                chat_template=cfg.get("chat_template"),
            )
        except (KeyError, TypeError) as e:
            raise DataError(f"{cfg_path} is incomplete ({e}); convert the model again") from None
        # The ids were recorded at conversion: a tokenizer.json swapped since must not pass.
        for name in ("eos_id", "bos_id"):
            if name in cfg and cfg[name] != getattr(tok, name):
                raise DataError(
                    f"{cfg_path} records {name} = {cfg[name]} but tokenizer.json "
                    f"gives {getattr(tok, name)}; the files do not belong together"
                )
        return tok
    raise DataError(f"{cfg_path} has unknown type {kind!r}; expected 'byte' or 'hf'")


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
