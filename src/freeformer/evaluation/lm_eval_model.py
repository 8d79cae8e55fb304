"""The Free Transformer as an lm-evaluation-harness model, registered as ``freeformer``.

``simple_evaluate(model="freeformer", model_args="pretrained=RUN_DIR,latent_mode=prior")``, or
an instance of :class:`FreeformerLM`. A baseline (``model.latent=false``) goes through the
same code with no latents.

Latents when scoring (``loglikelihood``, ``loglikelihood_rolling``); the estimators are in
``freeformer.likelihood``. The model defines P(S) = E_Z[P(S | Z)] over the codes Z of every
position, so the conditional a task asks for is

    log P(cont | ctx) = log E_Z[P(ctx | Z) P(cont | ctx, Z)] − log E_Z[P(ctx | Z)]:

codes must be consistent with the context. With k = ``latent_samples`` draws Z_j and a_j the
log-weight of draw j for the context, the score is the self-normalised importance-sampling
estimate ``log Σ_j e^{a_j} P(cont | ctx, Z_j) − log Σ_j e^{a_j}`` (consistent as k grows,
bias O(1/k)). ``latent_mode`` picks the proposal:

* ``"prior"`` (default: the lower error in every measurement, docs/evaluation.md): every code
  from the uniform prior, as in generation; a_j = log P(ctx | Z_j).
* ``"encoder"``: the context's codes from the encoder run over the context alone (a forward
  on the context tokens, as the paper's prefill does — the encoder is non-causal and never
  sees a continuation token), the continuation's from the prior;
  a_j = log P(ctx | Z_j) + Σ_{t < |ctx|} log P(Z_{j,t}) − log Q(Z_{j,t} | ctx).

``loglikelihood_rolling`` scores a document whose context is one conditioning token, so
P(ctx | Z) = 1 and the estimate is log (1/k) Σ_j w_j: ``prior``, w_j = P(S | Z_j);
``encoder``, the encoder over the whole window as the proposal, w_j = P(S | Z_j) P(Z_j) /
Q(Z_j | S) (validation's importance-sampled estimate).

Averaging P(cont | ctx, Z) over prior draws without the weights would estimate
log E_Z[P(cont | ctx, Z)], a different number; averaging log-probabilities, E_Z[log P(…)],
yet another.

``is_greedy`` is the greedy flag under the first draw: whether greedy decoding with those
codes (teacher-forced over the continuation) returns the continuation. Over a data set its
mean estimates how often greedy decoding with the first draw's codes produces it.

Randomness never depends on batch composition or order: draw j of a request comes from a
generator seeded by a hash of (``seed``, j, the context tokens fed to the model); it yields,
for positions 0..max_seq_len-1, prior codes and the uniforms that sample the encoder's bits.
The choices of one multiple-choice question therefore share their latents (common random
numbers), and ``batch_size`` changes no number.

Generation (``generate_until``): greedy unless the task asks ``do_sample`` (or a positive
``temperature``); prompt codes from the encoder (``prefill="encoder"``, the paper) or the prior
(``prefill="prior"``), a prior code for every new token; stops at an ``until`` string (which
is cut from the output), at the end-of-sequence token, or after ``max_gen_toks`` tokens (the
task's value, else the model argument).

Inputs longer than ``max_seq_len`` keep their last tokens (the continuation is kept whole
when it fits; a generation prompt keeps at least half the window, so generation may stop at
the window's end before ``max_gen_toks``); ``loglikelihood_rolling`` scores long documents in disjoint windows
(``lm_eval.utils.get_rolling_token_windows``) and sums the windows' estimates.
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from freeformer.errors import UserError
from freeformer.likelihood import (
    PROPOSALS,
    conditional_scores,
    encoder_proposal,
    posterior_log_weights,
    self_normalised,
)
from freeformer.model import IGNORE_INDEX
from freeformer.runtime import resolve_device

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as exc:  # the optional ``eval`` extra
    raise ImportError(f"lm-eval is not importable ({exc}); pip install 'freeformer[eval]'") from exc

log = logging.getLogger(__name__)

LATENT_MODES = PROPOSALS  # the importance-sampling proposals of freeformer.likelihood
PREFILL_MODES = ("encoder", "prior")
DEFAULT_BATCH_SIZE = 8
_GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


def request_seed(seed: int, context: Sequence[int], draw: int) -> int:
    """The seed of latent draw ``draw`` for a request whose model input starts with ``context``."""
    h = hashlib.blake2b(f"freeformer:{int(seed)}:{int(draw)}:".encode(), digest_size=8)
    h.update(array("q", context).tobytes())
    return int.from_bytes(h.digest(), "little") >> 1  # manual_seed wants < 2^63


def draw_latents(seed: int, length: int, n_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prior codes (length,) and bit uniforms (length, n_bits) for positions 0..length-1 (CPU).

    Always drawn for the model's whole ``max_seq_len``, so position t gets the same values
    whatever the length of the input.
    """
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << n_bits, (length,), generator=g)
    noise = torch.rand((length, n_bits), generator=g)
    return codes, noise


@dataclass(frozen=True)
class _Scored:
    """One (request, draw) row: ``inp`` is fed, its first ``n_ctx`` tokens the context."""

    req: int
    draw: int
    inp: tuple[int, ...]
    n_ctx: int
    targets: tuple[int, ...]
    """``inp`` shifted by one: positions < n_ctx − 1 predict the context, the rest ``cont``."""
    document: bool = False
    """Scored as a whole document, the encoder over ``inp`` as the proposal (rolling)."""


@dataclass(frozen=True)
class _GenOptions:
    until: tuple[str, ...]
    max_gen_toks: int
    temperature: float
    top_k: int | None
    top_p: float | None


def _int_option(name: str, value, lo: int = 1) -> int:
    v = None
    if isinstance(value, int) and not isinstance(value, bool):
        v = value
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        v = int(value)
    if v is None or v < lo:
        raise UserError(f"freeformer model argument {name}={value!r}: expected an integer ≥ {lo}")
    return v


@register_model("freeformer")
class FreeformerLM(TemplateLM):
    """lm-eval model over a freeformer run directory or checkpoint (see the module docstring).

    Arguments (all also accepted as ``model_args`` strings):
      pretrained: run directory (its newest checkpoint) or ``checkpoints/step_*`` directory.
      device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.
      batch_size: sequences per forward pass (a request takes ``latent_samples`` of them);
        ``auto`` means 8.
      latent_mode: ``prior`` or ``encoder``: the importance-sampling proposal of the codes
        (module docstring; ignored by a baseline).
      latent_samples: draws k per request (1 for a baseline).
      seed: seeds every latent draw and sampled generation.
      max_gen_toks: generation length when the task does not give one.
      prefill: ``encoder`` (the paper) or ``prior``: where prompt codes come from in generation.
    """

    def __init__(
        self,
        pretrained: str | Path,
        device: str | None = "auto",
        batch_size: int | str = DEFAULT_BATCH_SIZE,
        latent_mode: str = "prior",
        latent_samples: int = 4,
        seed: int = 0,
        max_gen_toks: int = 256,
        prefill: str = "encoder",
        max_batch_size: int | None = None,  # passed by simple_evaluate; unused
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise UserError(
                f"unknown freeformer model argument(s): {', '.join(sorted(unknown))}; valid: "
                "pretrained, device, batch_size, latent_mode, latent_samples, seed, "
                "max_gen_toks, prefill"
            )
        from freeformer.checkpoint import load_model, load_run_tokenizer

        if latent_mode not in LATENT_MODES:
            raise UserError(
                f"latent_mode={latent_mode!r}: expected one of {', '.join(LATENT_MODES)}"
            )
        if prefill not in PREFILL_MODES:
            raise UserError(f"prefill={prefill!r}: expected one of {', '.join(PREFILL_MODES)}")
        if isinstance(batch_size, str) and batch_size.strip().startswith("auto"):
            batch_size = DEFAULT_BATCH_SIZE
        self.batch_size = _int_option("batch_size", batch_size)
        self.seed = _int_option("seed", seed, lo=0)
        self.max_gen_toks = _int_option("max_gen_toks", max_gen_toks)
        k = _int_option("latent_samples", latent_samples)
        self._device = resolve_device(device, flag="device")
        self.model, self.checkpoint = load_model(pretrained, self._device)
        self.tok = load_run_tokenizer(self.checkpoint)
        self.pretrained = str(pretrained)
        c = self.model.config
        self.latent = bool(c.latent)
        self.latent_mode = latent_mode
        self.prefill = prefill
        self.latent_samples = k if self.latent else 1

    # ------------------------------------------------------------------- lm-eval plumbing
    @property
    def eot_token_id(self) -> int | None:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        # Conditions empty contexts and the first rolling window. A converted pretrained
        # model's tokenizer has the source's BOS: lm-eval's own `hf` model uses it, so the
        # scores agree. Otherwise training data ends every document with EOS, so EOS starts
        # one; the synthetic vocabulary has none: id 0 ('_').
        bos = getattr(self.tok, "bos_id", None)
        if bos is not None:
            return int(bos)
        eos = self.tok.eos_id
        return 0 if eos is None else int(eos)

    @property
    def max_length(self) -> int:
        return int(self.model.config.max_seq_len)

    @property
    def tokenizer_name(self) -> str:
        return f"freeformer-{type(self.tok).__name__}-{self.tok.vocab_size}"

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        ids = list(self.tok.encode(string))
        # As lm-eval's `hf` model does with the source tokenizer: its default special
        # tokens (BOS first, for a converted model whose source adds one), unless the text
        # already starts with BOS. Tokenizers of freeformer's own data add nothing.
        bos = getattr(self.tok, "bos_id", None)
        if (
            add_special_tokens is not False
            and getattr(self.tok, "add_bos", False)
            and ids[:1] != [bos]
        ):
            ids = [bos, *ids]
        return ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))

    def get_model_info(self) -> dict:
        """Merged by ``simple_evaluate`` into ``results["config"]``."""
        c = self.model.config
        return {
            "freeformer_checkpoint": str(self.checkpoint.path),
            "freeformer_step": self.checkpoint.step,
            "latent": self.latent,
            "latent_bits": int(c.latent_bits) if self.latent else None,
            "latent_mode": self.latent_mode if self.latent else None,
            "latent_samples": self.latent_samples,
            "prefill": self.prefill if self.latent else None,
            "seed": self.seed,
            "max_seq_len": self.max_length,
            "num_params": self.model.num_params(),
        }

    # --------------------------------------------------------------------- log-likelihood
    def _rows(self, requests, document: bool = False) -> tuple[list[_Scored], int]:
        """Truncate each (context, continuation) to the model and expand it into k draws."""
        L, rows, clipped = self.max_length, [], 0
        for i, (_, ctx, cont) in enumerate(requests):
            ctx, cont = list(ctx), list(cont)
            if not cont:
                continue
            full = (ctx + cont)[-(L + 1) :]  # keep the end: the continuation, then the context
            inp = full[:-1]
            n_cont = min(len(cont), len(inp))
            clipped += n_cont < len(cont)
            n_ctx = len(inp) - (n_cont - 1)  # inp = context fed + cont[:-1]
            for j in range(self.latent_samples):
                rows.append(_Scored(i, j, tuple(inp), n_ctx, tuple(full[1:]), document))
        if clipped:
            log.warning(
                "%d continuation(s) longer than max_seq_len=%d: only their last tokens are scored",
                clipped, L,
            )  # fmt: skip
        return rows, len(requests)

    def _latents(self, row: _Scored) -> tuple[torch.Tensor, torch.Tensor]:
        seed = request_seed(self.seed, row.inp[: row.n_ctx], row.draw)
        return draw_latents(seed, self.max_length, self.model.config.latent_bits)

    def _equal_length_batches(self, keyed: dict) -> list[list]:
        """Batches of items whose key's first element (a token tuple) has one length: the
        encoder is non-causal, so padding would change what it sees."""
        by_len: dict[int, list] = defaultdict(list)
        for key, r in keyed.items():
            by_len[len(key[0])].append((key, r))
        return [
            group[s : s + self.batch_size]
            for _, group in sorted(by_len.items(), reverse=True)
            for s in range(0, len(group), self.batch_size)
        ]

    @torch.no_grad()
    def _encoder_codes(self, rows: list[_Scored], disable_tqdm: bool) -> dict:
        """Encoder codes of each distinct (context, draw), from a forward over the context alone,
        with their log P(Z) − log Q(Z | context) per position."""
        todo: dict[tuple, _Scored] = {}
        for r in rows:
            todo.setdefault((r.inp[: r.n_ctx], r.draw), r)
        out: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        batches = self._equal_length_batches(todo)
        for batch in tqdm(batches, desc="freeformer encoder", disable=disable_tqdm):
            ctx = torch.tensor([key[0] for key, _ in batch], device=self._device)
            T = ctx.shape[1]
            noise = torch.stack([self._latents(r)[1][:T] for _, r in batch]).to(self._device)
            codes, ratio = encoder_proposal(self.model, ctx, bit_noise=noise)
            for (key, _), c, q in zip(batch, codes.cpu(), ratio.float().cpu()):
                out[key] = (c, q)
        return out

    @torch.no_grad()
    def _score_documents(
        self, rows: list[int], all_rows: list[_Scored], results: list, disable_tqdm: bool
    ) -> None:
        """Rows scored as whole documents, the encoder over each row as the proposal:
        (a, b) = (0, log P(S | Z) + log P(Z) − log Q(Z | S))."""
        keyed = {(all_rows[i].inp, i): i for i in rows}
        for batch in tqdm(self._equal_length_batches(keyed), desc="freeformer documents",
                          disable=disable_tqdm):  # fmt: skip
            sel = [all_rows[i] for _, i in batch]
            T = len(sel[0].inp)
            tokens = torch.tensor([r.inp for r in sel], device=self._device)
            targets = torch.tensor([r.targets for r in sel], device=self._device)
            noise = torch.stack([self._latents(r)[1][:T] for r in sel]).to(self._device)
            lw, _, _ = posterior_log_weights(self.model, tokens, targets, bit_noise=noise)
            for (_, i), v in zip(batch, lw.tolist()):
                results[i] = (0.0, v, False)

    @torch.no_grad()
    def _score_rows(
        self, rows: list[_Scored], disable_tqdm: bool
    ) -> list[tuple[float, float, bool]]:
        """Per row (one draw of one request): a = the draw's log weight for the context,
        b = log P(continuation | context, codes), and whether each target is the argmax."""
        results: list[tuple[float, float, bool] | None] = [None] * len(rows)
        docs = [i for i, r in enumerate(rows) if r.document]
        if docs:
            self._score_documents(docs, rows, results, disable_tqdm)
        cond = [i for i, r in enumerate(rows) if not r.document]
        enc = (
            self._encoder_codes([rows[i] for i in cond], disable_tqdm)
            if self.latent and self.latent_mode == "encoder"
            else {}
        )
        order = sorted(cond, key=lambda i: -len(rows[i].inp))
        batches = [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc="freeformer loglikelihood", disable=disable_tqdm):
            T = len(rows[batch[0]].inp)
            tokens = torch.zeros((len(batch), T), dtype=torch.long)
            targets = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
            codes = torch.zeros((len(batch), T), dtype=torch.long) if self.latent else None
            ratio = torch.zeros((len(batch), T)) if enc else None
            for b, i in enumerate(batch):
                r = rows[i]
                n = len(r.inp)
                tokens[b, :n] = torch.tensor(r.inp)  # right padding: the decoder is causal
                targets[b, :n] = torch.tensor(r.targets)
                if codes is not None:
                    codes[b, :n] = self._latents(r)[0][:n]
                    if enc:
                        c, q = enc[(r.inp[: r.n_ctx], r.draw)]
                        codes[b, : r.n_ctx], ratio[b, : r.n_ctx] = c, q
            dev = self._device
            s = conditional_scores(
                self.model, tokens.to(dev), targets.to(dev),
                torch.tensor([rows[i].n_ctx for i in batch]),
                codes.to(dev) if codes is not None else None,
                ratio.to(dev) if ratio is not None else None,
            )  # fmt: skip
            for b, i in enumerate(batch):
                results[i] = (s.log_w[b].item(), s.log_cont[b].item(), bool(s.greedy[b]))
        return results

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, *, document: bool = False, **kwargs
    ):
        """``requests``: (cache key, context ids, continuation ids) → [(log P, is_greedy)].

        ``document``: score each continuation as a whole document (``loglikelihood_rolling``
        windows, whose context is one conditioning token): in ``encoder`` mode the proposal
        is then the encoder over the whole window.
        """
        document = document and self.latent and self.latent_mode == "encoder"
        rows, n = self._rows(requests, document)
        scored = self._score_rows(rows, disable_tqdm)
        per_req: list[list[tuple[float, float, bool]]] = [[] for _ in range(n)]
        for r, s in sorted(zip(rows, scored), key=lambda x: (x[0].req, x[0].draw)):
            per_req[r.req].append(s)
        out = []
        for (key, _, _), draws in zip(requests, per_req):
            if not draws:  # empty continuation
                res = (0.0, True)
            else:
                a = torch.tensor([d[0] for d in draws], dtype=torch.float64)
                b = torch.tensor([d[1] for d in draws], dtype=torch.float64)
                # log Σ_j w_j P(cont | ctx, Z_j) / Σ_j w_j: codes consistent with the context
                res = (self_normalised(a, b).item(), draws[0][2])
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
            out.append(res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, req in enumerate(requests):
            (string,) = req.args
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm, document=True)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, scores):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------------- generation
    def _gen_options(self, kwargs: dict | None) -> _GenOptions:
        kw = dict(kwargs or {})
        ignored = sorted(set(kw) - _GEN_KEYS)
        if ignored:
            log.warning("generation arguments ignored by freeformer: %s", ", ".join(ignored))
        until = kw.get("until") or []
        until = (until,) if isinstance(until, str) else tuple(until)
        temperature = float(kw.get("temperature", 0.0) or 0.0)
        do_sample = kw.get("do_sample")
        do_sample = temperature > 0 if do_sample is None else bool(do_sample)
        if do_sample and temperature <= 0:
            temperature = 1.0
        top_k = kw.get("top_k")
        top_p = kw.get("top_p")
        return _GenOptions(
            until=tuple(u for u in until if u),
            max_gen_toks=_int_option("max_gen_toks", kw.get("max_gen_toks", self.max_gen_toks)),
            temperature=temperature if do_sample else 0.0,
            top_k=int(top_k) if top_k else None,
            top_p=float(top_p) if top_p is not None and do_sample else None,
        )

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        L = self.max_length
        groups: dict[tuple, list[tuple[int, list[int]]]] = defaultdict(list)
        for i, req in enumerate(requests):
            context, kwargs = req.args
            opts = self._gen_options(kwargs)
            ctx = self.tok_encode(context) or [self.prefix_token_id]
            # Room for the new tokens, but the prompt keeps at least half the window.
            ctx = ctx[-(L - min(opts.max_gen_toks, L // 2)) :]
            n_new = min(opts.max_gen_toks, L - len(ctx))
            groups[(len(ctx), n_new, opts)].append((i, ctx))
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="freeformer generate", disable=disable_tqdm)
        for (_, n_new, opts), items in groups.items():
            for s in range(0, len(items), self.batch_size):
                batch = items[s : s + self.batch_size]
                texts = self._generate_batch([ctx for _, ctx in batch], n_new, opts)
                for (i, _), text in zip(batch, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return out

    @torch.no_grad()
    def _generate_batch(self, ctxs: list[list[int]], n_new: int, opts: _GenOptions) -> list[str]:
        """Continue prompts of equal length (no padding: the encoder is non-causal)."""
        from freeformer.generate import decode_stream, new_cache, prefill_prompt, sample

        B, T0 = len(ctxs), len(ctxs[0])
        dev = self._device
        prompt = torch.tensor(ctxs, device=dev)
        seeds = [request_seed(self.seed, ctx, 0) for ctx in ctxs]
        gens = [torch.Generator(device=dev).manual_seed(s ^ 0x5EED) for s in seeds]
        codes = None
        cache = new_cache(self.model, B, T0 + n_new)
        if self.latent:
            drawn = [draw_latents(s, self.max_length, self.model.config.latent_bits) for s in seeds]
            codes = torch.stack([c for c, _ in drawn]).to(dev)
            if self.prefill == "encoder":
                noise = torch.stack([z[:T0] for _, z in drawn]).to(dev)
                out = prefill_prompt(self.model, prompt, cache, None, bit_noise=noise)
            else:
                out = prefill_prompt(self.model, prompt, cache, codes[:, :T0])
        else:
            out = prefill_prompt(self.model, prompt, cache)

        def pick(logits: torch.Tensor) -> torch.Tensor:
            if opts.temperature == 0:
                return logits.argmax(-1)
            # one generator per request: samples do not depend on the batch
            return torch.cat([
                sample(logits[b : b + 1], opts.temperature, opts.top_k, opts.top_p, gens[b])
                for b in range(B)
            ])  # fmt: skip

        eos = self.tok.eos_id
        new: list[list[int]] = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool)
        for nxt in decode_stream(self.model, out.logits[:, -1], cache, n_new, pick,
                                 codes=codes, finished=done):  # fmt: skip
            for b, tok in enumerate(nxt.tolist()):
                if done[b]:
                    continue
                if eos is not None and tok == eos:
                    done[b] = True
                    continue
                new[b].append(tok)
                if opts.until and any(u in self.tok_decode(new[b]) for u in opts.until):
                    done[b] = True
        texts = []
        for ids in new:
            text = self.tok_decode(ids)
            for u in opts.until:
                text = text.split(u, 1)[0]
            texts.append(text)
        return texts
