"""The synthetic "target in noise" task of Section 4.1 (Figures 3–4).

A sequence is a two-character prompt ``"<letter>>"`` followed by a 64-character body: 64
underscores, in which the prompt letter is written 8 times in a row at a uniformly random
start (the *target*), after which every body character is independently replaced by ``'!'``
with probability 1/16. The prompt is never noised. Example (2 + 64 characters)::

    K>_____!______KKKK!KKK_________________________________!__________

The task is built so that a sequence has two independent "global" random factors — where
the target is and where the noise falls — which the Free Transformer's latent can choose
to encode (Figure 4). This module holds the character vocabulary, a vectorised sampler, the
training stream (:class:`SyntheticBatches`, same protocol as the file-based loader) and
:func:`parse`, which recovers the factors from a generated string so they can be scored
(see :mod:`freeformer.experiments.scoring`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from freeformer.errors import CheckpointError, ConfigError, DataError, UserError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ALPHABET = "_!>" + LETTERS
"""Character vocabulary; a character's token id is its index (``'_'`` = 0, ``'!'`` = 1)."""
VOCAB_SIZE = len(ALPHABET)  # 29
BLANK, NOISE, ARROW = 0, 1, 2
FIRST_LETTER_ID = 3

PROMPT_LEN = 2
BODY = 64
TARGET_LEN = 8
SEQ_LEN = PROMPT_LEN + BODY  # 66
NOISE_P = 1 / 16
MAX_START = BODY - TARGET_LEN  # 56: the 8-run must fit inside the body

_CHAR_TO_ID = {c: i for i, c in enumerate(ALPHABET)}


def encode(s: str) -> torch.Tensor:
    """Token ids (1-D ``LongTensor``) of a string over :data:`ALPHABET`."""
    try:
        ids = [_CHAR_TO_ID[c] for c in s]
    except KeyError as e:
        raise DataError(
            f"character {e.args[0]!r} is not in the synthetic alphabet {ALPHABET!r}"
        ) from None
    return torch.tensor(ids, dtype=torch.long)


def decode(ids: torch.Tensor | Iterable[int]) -> str:
    """String of a 1-D sequence of ids; ids outside the alphabet become ``'?'``.

    Generation from a model with a larger vocabulary must still be printable, so this never
    raises on a bad id.
    """
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    return "".join(ALPHABET[i] if 0 <= i < VOCAB_SIZE else "?" for i in ids)


# --------------------------------------------------------------------------- sampling


class SyntheticTokenizer:
    """The character vocabulary behind the ``data.tokenizer.Tokenizer`` interface (what
    ``freeformer generate`` and ``validate`` use for a run trained on this task)."""

    eos_id = None
    vocab_size = VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        try:
            return encode(text).tolist()
        except UserError as e:
            raise UserError(f"{e} (the synthetic task's alphabet is {ALPHABET!r})") from None

    def decode(self, ids) -> str:
        return decode(ids)

    encode_prompt = encode  # no BOS

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        raise UserError("the synthetic task's vocabulary has no chat template")


@dataclass(frozen=True)
class Sample:
    """A batch of sequences with the random factors that produced them (for tests/analysis).

    ``tokens`` (n, 66) long; ``letter`` (n,) long token ids; ``start`` (n,) long, 0-based
    start of the target inside the body; ``noise`` (n, 64) bool, body positions set to '!'.
    """

    tokens: torch.Tensor
    letter: torch.Tensor
    start: torch.Tensor
    noise: torch.Tensor


def sample_annotated(n: int, generator: torch.Generator) -> Sample:
    """Draw ``n`` sequences of the Section 4.1 task, vectorised, with their factors.

    The result depends only on the generator's state. Draw order (part of the
    reproducibility contract): letters, then target starts, then (n, 64) noise draws.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"number of sequences must be a non-negative int, got {n!r}")
    device = generator.device
    letter = torch.randint(26, (n,), generator=generator, device=device) + FIRST_LETTER_ID
    start = torch.randint(MAX_START + 1, (n,), generator=generator, device=device)
    # randint(16) == 0 has probability exactly 1/16 (no float rounding).
    noise = torch.randint(16, (n, BODY), generator=generator, device=device, dtype=torch.uint8) == 0

    # Built in uint8 and copied once into the long output: this is the hot path of training
    # on the synthetic task, and byte arithmetic is several times cheaper than int64.
    pos = torch.arange(BODY, device=device, dtype=torch.uint8)
    # pos - start wraps around to >= 200 when pos < start, so one comparison suffices.
    offset = pos - start.to(torch.uint8)[:, None]  # (n, 64)
    in_target = offset < TARGET_LEN
    body = torch.where(
        in_target,
        letter.to(torch.uint8)[:, None],
        torch.zeros((), dtype=torch.uint8, device=device),
    )
    body.masked_fill_(noise, NOISE)  # noise hits target characters too
    tokens = torch.empty((n, SEQ_LEN), dtype=torch.long, device=device)
    tokens[:, 0] = letter  # the prompt "<letter>>" is never noised
    tokens[:, 1] = ARROW
    tokens[:, PROMPT_LEN:] = body
    return Sample(tokens=tokens, letter=letter, start=start, noise=noise)


def sample_batch(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` sequences as a ``LongTensor`` of shape (n, 66)."""
    return sample_annotated(n, generator).tokens


def sample_strings(n: int, generator: torch.Generator) -> list[str]:
    """``n`` sequences as 66-character strings (same draws as :func:`sample_batch`)."""
    return [decode(row) for row in sample_batch(n, generator)]


def random_prompt(generator: torch.Generator) -> str:
    """A prompt ``"<letter>>"`` with a uniform letter, e.g. ``"Q>"``."""
    i = int(torch.randint(26, (1,), generator=generator, device=generator.device))
    return LETTERS[i] + ">"


# --------------------------------------------------------------------------- training stream


def _stream_seed(stream: str, seed: int, index: int) -> int:
    # A hash, not an affine map like seed * C + step: training and validation streams of
    # any two seeds can then never share a generator seed (up to 64-bit collisions).
    digest = hashlib.blake2b(
        f"freeformer.synthetic/{stream}/{seed}/{index}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little")


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class SyntheticBatches:
    """Endless training batches of the synthetic task; same protocol as the file loader.

    The global batch of step ``s`` is drawn from a fresh generator seeded by a hash of
    ``(seed, s)``, so it does not depend on how many batches were drawn before, nor on the
    number of ranks: rank ``r`` of ``world_size`` takes rows ``[r*b, (r+1)*b)`` with
    ``b = batch_size // world_size``, and concatenating the ranks gives the single-process
    batch. ``state_dict()`` is just the step, so a resumed run sees exactly the batches an
    uninterrupted one would. Each call returns ``(x, y)`` with ``x = seq[:, :-1]`` and
    ``y = seq[:, 1:]`` (next-character prediction), both of shape (b, 65).
    """

    vocab_size = VOCAB_SIZE
    seq_len = SEQ_LEN - 1  # 65: length of x and y

    def __init__(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        if rank >= world_size:
            raise ConfigError(f"rank must be < world_size={world_size}, got {rank}")
        if batch_size % world_size:
            raise ConfigError(
                f"batch_size={batch_size} must be divisible by world_size={world_size}"
            )
        self.local_batch_size = batch_size // world_size
        self.step = 0

    def _batch(self, stream: str, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(_stream_seed(stream, self.seed, index))
        seq = sample_batch(self.batch_size, g)  # (batch_size, 66), the global batch
        b = self.local_batch_size
        seq = seq[self.rank * b : (self.rank + 1) * b]  # (b, 66)
        return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()  # (b, 65) each

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``(x, y)`` for the current step, then advance the step."""
        batch = self._batch("train", self.step)
        self.step += 1
        return batch

    def fixed_batches(self, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A deterministic validation set: ``n_batches`` batches from a stream disjoint from
        training (a different hash domain), sharded per rank like training. Does not move
        the training step."""
        _check_int("n_batches", n_batches, 0)
        return [self._batch("valid", i) for i in range(n_batches)]

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        step = state.get("step") if isinstance(state, dict) else None
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise CheckpointError(
                f"synthetic data state needs a non-negative int 'step', got {state!r}"
            )
        self.step = step


# --------------------------------------------------------------------------- parsing

REASONS = (
    "bad length",
    "bad prompt",
    "foreign character",
    "no target",
    "target too wide",
    "gap in target",
    "target too short",
)
"""Every value :attr:`Parsed.reason` can take for an invalid string, in the order checked."""


@dataclass(frozen=True)
class Parsed:
    """What :func:`parse` read from a string.

    ``letter`` is set whenever the prompt is well formed, ``noise`` (body indices holding
    ``'!'``) whenever the length is 66, ``position`` only when ``valid``. ``reason`` is one
    of :data:`REASONS` when invalid, ``""`` when valid.
    """

    valid: bool
    letter: str | None
    position: int | None
    noise: frozenset[int]
    reason: str


def parse(s: str) -> Parsed:
    """Recover letter, target position and noise from a (generated) task string.

    A string is **valid** iff, checked in this order (the first failure is the reason):

    1. ``len(s) == 66`` — else ``"bad length"``;
    2. ``s[0]`` is in A–Z and ``s[1] == '>'`` — else ``"bad prompt"``;
    3. every body character ``s[2:]`` is ``'_'``, ``'!'`` or the prompt letter — else
       ``"foreign character"`` (another letter, ``'>'``, ``'?'``…);
    4. the prompt letter occurs in the body — else ``"no target"``;
    5. its first and last occurrences ``f, l`` satisfy ``l - f < 8`` — else
       ``"target too wide"`` (a run longer than 8, or two separate runs);
    6. no ``'_'`` lies in ``[f, l]`` — else ``"gap in target"``;
    7. some start ``p`` in ``[0, 56]`` has all occurrences in ``[p, p+8)`` and no ``'_'`` in
       ``[p, p+8)`` (noise may hide target letters but not turn them into ``'_'``) — else
       ``"target too short"``.

    Ambiguity rule: when several ``p`` qualify (noise next to the target), ``position`` is
    the **smallest** one. Every qualifying window contains all occurrences, so this is the
    smallest start consistent with the string. For a sample of the task with true start
    ``t`` the result equals ``t`` unless ``body[t-1]`` is ``'!'`` (and enough of the end of
    the target is noised too), which happens with probability about 1/256.
    """
    n = len(s)
    if n != SEQ_LEN:
        return Parsed(False, None, None, frozenset(), "bad length")
    body = s[PROMPT_LEN:]
    noise = frozenset(i for i, c in enumerate(body) if c == "!")
    letter = s[0]
    if letter not in LETTERS or s[1] != ">":
        return Parsed(False, None, None, noise, "bad prompt")

    def invalid(reason: str) -> Parsed:
        return Parsed(False, letter, None, noise, reason)

    if any(c != "_" and c != "!" and c != letter for c in body):
        return invalid("foreign character")
    first, last = body.find(letter), body.rfind(letter)
    if first < 0:
        return invalid("no target")
    if last - first >= TARGET_LEN:
        return invalid("target too wide")
    if "_" in body[first : last + 1]:
        return invalid("gap in target")
    # Candidate windows [p, p+8) must contain [first, last] and fit in the body.
    for p in range(max(0, last - TARGET_LEN + 1), min(first, MAX_START) + 1):
        if "_" not in body[p : p + TARGET_LEN]:
            return Parsed(True, letter, p, noise, "")
    return invalid("target too short")
