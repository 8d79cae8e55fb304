"""The lm-eval adapter: scoring maths, latent handling (no leak), batching, generation, tasks."""

import math
import textwrap

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from freeformer import cli  # noqa: E402
from freeformer.data.prepare import prepare  # noqa: E402
from freeformer.errors import UserError  # noqa: E402
from freeformer.evaluation.lm_eval_model import (  # noqa: E402
    FreeformerLM,
    draw_latents,
    request_seed,
)
from freeformer.generate import generate  # noqa: E402

CORPUS = "".join(
    f"def f{i}(x, y):\n    return x * {i} + y  # {'abcdefghij'[i % 10] * (i % 7)}\n\n"
    for i in range(300)
)


def make_run(root, latent: bool):
    """A byte-level Free Transformer (or baseline) trained for 2 steps on a tiny corpus."""
    corpus = root / "corpus"
    if not corpus.exists():
        corpus.mkdir()
        (corpus / "a.py").write_text(CORPUS)
        prepare([str(corpus)], str(root / "data"), tokenizer="byte")
    run = root / ("ft" if latent else "base")
    rc = cli.main([
        "train", "--preset", "debug", "--out", str(run), "--data.source=files",
        f"--data.path={root / 'data'}", "--model.vocab_size=257", "--train.seq_len=64",
        "--train.max_steps=2", "--train.eval_every=0", f"--model.latent={str(latent).lower()}",
        "--train.progress=false", "--quiet",
    ])  # fmt: skip
    assert rc == 0
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lm_eval_runs")
    return {"ft": make_run(root, True), "base": make_run(root, False)}


def loud(lm):
    """After 2 training steps the codes barely move the logits: amplify the injection block's
    attention output (where r enters) and the readout, so that the draws visibly matter."""
    m = lm.model
    with torch.no_grad():
        m.blocks[m.config.inject_layer].attn.wo.weight.mul_(300.0)
        (m.head.weight if m.head is not None else m.tok_emb.weight).mul_(20.0)
    return lm


def req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


PAIRS = [
    ("def f3(x, y):\n    return", " x * 3 + y"),
    ("def f3(x, y):\n    return", " y"),
    ("def f12(x, y):\n", "    return x * 12 + y  # ccccc\n"),
    ("", "def"),  # empty context: conditioned on EOS
    ("x" * 150, " = 1"),  # longer than max_seq_len=128: the context is truncated on the left
]


def manual_ll(lm, ctx, cont, latents=None, with_context=False):
    """Sum of log-softmax over the continuation from one plain forward (left truncation);
    ``with_context``: also the sum over the context's predicted tokens."""
    n = len(ctx) - len(ctx.rstrip())  # lm-eval moves the context's trailing spaces over
    ctx, cont = (ctx[:-n], ctx[-n:] + cont) if n else (ctx, cont)
    ctx_ids = lm.tok_encode(ctx) if ctx else [lm.prefix_token_id]
    cont_ids = lm.tok_encode(cont)
    full = (ctx_ids + cont_ids)[-(lm.max_length + 1) :]
    inp = full[:-1]
    logits = lm.model(torch.tensor([inp]), latents=latents(inp, len(inp) - len(cont_ids) + 1)
                      if latents else None).logits[0]  # fmt: skip
    logp = logits.log_softmax(-1).gather(-1, torch.tensor(full[1:])[:, None])[:, 0]
    m = len(cont_ids)
    greedy = bool((logits[-m:].argmax(-1) == torch.tensor(cont_ids)).all())
    if with_context:
        return logp[:-m].sum().item(), logp[-m:].sum().item(), greedy
    return logp[-m:].sum().item(), greedy


def test_registered_and_built_from_arg_string(runs):
    assert get_model("freeformer") is FreeformerLM
    lm = FreeformerLM.create_from_arg_string(
        f"pretrained={runs['ft']},latent_mode=encoder,latent_samples=2,seed=3",
        {"batch_size": 4, "device": "cpu"},
    )
    assert (lm.latent_mode, lm.latent_samples, lm.seed, lm.batch_size) == ("encoder", 2, 3, 4)
    assert lm.get_model_info()["latent_bits"] == lm.model.config.latent_bits
    base = FreeformerLM(runs["base"], device="cpu", latent_samples=4)
    assert base.latent_samples == 1 and base.get_model_info()["latent"] is False


@pytest.mark.parametrize("kwargs, match", [
    ({"latent_mode": "posterior"}, "latent_mode"),
    ({"latent_samples": 0}, "latent_samples"),
    ({"batch_size": "big"}, "batch_size"),
    ({"prefill": "oracle"}, "prefill"),
    ({"temperature": 1.0}, "unknown freeformer model argument"),
])  # fmt: skip
def test_bad_model_arguments_are_user_errors(runs, kwargs, match):
    with pytest.raises(UserError, match=match):
        FreeformerLM(runs["base"], device="cpu", **kwargs)


def test_baseline_loglikelihood_is_sum_of_log_softmax(runs):
    lm = FreeformerLM(runs["base"], device="cpu", batch_size=3)
    got = lm.loglikelihood([req("loglikelihood", c, x) for c, x in PAIRS], disable_tqdm=True)
    with torch.no_grad():
        want = [manual_ll(lm, c, x) for c, x in PAIRS]
    for (ll, greedy), (ll_ref, greedy_ref) in zip(got, want):
        assert ll == pytest.approx(ll_ref, rel=1e-5, abs=1e-4)
        assert greedy == greedy_ref


def test_prior_mode_weights_draws_by_the_context(runs):
    """log P(cont | ctx) ≈ log Σ_j P(ctx | Z_j) P(cont | ctx, Z_j) − log Σ_j P(ctx | Z_j)."""
    k = 3
    lm = loud(FreeformerLM(runs["ft"], device="cpu", latent_mode="prior", latent_samples=k, seed=7))
    H, L = lm.model.config.latent_bits, lm.max_length
    got = lm.loglikelihood([req("loglikelihood", c, x) for c, x in PAIRS], disable_tqdm=True)
    with torch.no_grad():
        for (ctx, cont), (ll, greedy) in zip(PAIRS, got):
            draws = [
                manual_ll(lm, ctx, cont, lambda inp, n_ctx, j=j: draw_latents(
                    request_seed(7, inp[:n_ctx], j), L, H)[0][: len(inp)][None],
                    with_context=True)
                for j in range(k)
            ]  # fmt: skip
            a = torch.tensor([d[0] for d in draws], dtype=torch.float64)
            b = torch.tensor([d[1] for d in draws], dtype=torch.float64)
            assert b.max() - b.min() > 1e-4  # the draws matter...
            ref = (torch.logsumexp(a + b, 0) - torch.logsumexp(a, 0)).item()
            assert ll == pytest.approx(ref, rel=1e-5, abs=1e-4)
            old = (torch.logsumexp(b, 0) - math.log(k)).item()  # log E_Z[P(cont | ctx, Z)]
            if ctx:  # ...weighted by how well each explains the context: not the plain mean
                assert abs(ll - old) > 1e-3
            assert greedy == draws[0][2]  # is_greedy: under the first draw


def test_encoder_mode_never_shows_the_continuation_to_the_encoder(runs):
    lm = loud(
        FreeformerLM(runs["ft"], device="cpu", latent_mode="encoder", latent_samples=2, seed=1)
    )
    model, H, L = lm.model, lm.model.config.latent_bits, lm.max_length
    ctx, conts = "def f5(x, y):\n    return", [" x * 5 + y", " 0", " x * 5 + y  # ffff"]
    ctx_ids = lm.tok_encode(ctx)

    encoder_lengths, pinned = [], []
    hook = model.encoder.register_forward_hook(
        lambda mod, args, out: encoder_lengths.extend([args[0].shape[1]] * args[0].shape[0])
    )
    embed = model.post_sampler.embed
    model.post_sampler.embed = lambda codes: (pinned.append(codes.clone()), embed(codes))[1]
    try:
        got = lm.loglikelihood([req("loglikelihood", ctx, c) for c in conts], disable_tqdm=True)
    finally:
        hook.remove()
        model.post_sampler.embed = embed

    # The encoder only ever ran over the context: one pass per draw, shared by the 3 choices.
    assert len(encoder_lengths) == 2 and set(encoder_lengths) == {len(ctx_ids)}
    with torch.no_grad():
        for cont, (ll, _) in zip(conts, got):
            inp = (ctx_ids + lm.tok_encode(cont))[:-1]
            a, b = [], []
            for j in range(2):
                codes, noise = draw_latents(request_seed(1, ctx_ids, j), L, H)
                # codes of the context: those of a forward over the context alone
                out = model(torch.tensor([ctx_ids]), bit_noise=noise[None, : len(ctx_ids)])
                enc = out.codes[0]
                want = torch.cat([enc, codes[len(ctx_ids) : len(inp)]])
                assert any(torch.equal(p[: len(inp)], want) for b in pinned for p in b)
                # importance weight of the context's codes: P(ctx | Z) P(Z) / Q(Z | ctx)
                bits = (enc[:, None] >> torch.arange(H)) & 1
                logq = torch.where(
                    bits.bool(),
                    torch.nn.functional.logsigmoid(out.bit_logits[0]),
                    torch.nn.functional.logsigmoid(-out.bit_logits[0]),
                ).sum()
                logits = model(torch.tensor([inp]), latents=want[None]).logits[0]
                tgt = torch.tensor((ctx_ids + lm.tok_encode(cont))[1:])
                logp = logits.log_softmax(-1).gather(-1, tgt[:, None])[:, 0]
                n = len(ctx_ids) - 1
                a.append(logp[:n].sum().item() - len(ctx_ids) * H * math.log(2) - logq.item())
                b.append(logp[n:].sum().item())
            a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
            ref = (torch.logsumexp(a + b, 0) - torch.logsumexp(a, 0)).item()
            assert ll == pytest.approx(ref, rel=1e-5, abs=1e-4)
            assert abs(ll - (torch.logsumexp(b, 0) - math.log(2)).item()) > 1e-3


@pytest.mark.parametrize("run, mode", [("base", "prior"), ("ft", "prior"), ("ft", "encoder")])
def test_scores_do_not_depend_on_batching_or_order(runs, run, mode):
    reqs = [req("loglikelihood", c, x) for c, x in PAIRS]

    def score(batch_size, order):
        lm = FreeformerLM(runs[run], device="cpu", batch_size=batch_size, latent_mode=mode,
                          latent_samples=2)  # fmt: skip
        if lm.latent:
            loud(lm)
        out = lm.loglikelihood([reqs[i] for i in order], disable_tqdm=True)
        return [out[order.index(i)] for i in range(len(reqs))]

    one = score(1, list(range(len(reqs))))
    many = score(7, list(reversed(range(len(reqs)))))
    for (a, ga), (b, gb) in zip(one, many):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-4) and ga == gb


def test_rolling_scores_disjoint_windows(runs):
    lm = FreeformerLM(runs["base"], device="cpu", batch_size=4)
    L = lm.max_length
    short, long = CORPUS[:60], CORPUS[: 2 * L + 37]
    got = lm.loglikelihood_rolling(
        [req("loglikelihood_rolling", short), req("loglikelihood_rolling", long)],
        disable_tqdm=True)  # fmt: skip
    # a document within one window is the continuation of the EOS prefix
    ((ll_short, _),) = lm.loglikelihood([req("loglikelihood", "", short)], disable_tqdm=True)
    assert got[0] == pytest.approx(ll_short, rel=1e-5)
    # a long one: chunks of L tokens, each conditioned on the token before it (or EOS)
    ids = lm.tok_encode(long)
    full = [lm.prefix_token_id] + ids
    total = 0.0
    with torch.no_grad():
        for s in range(0, len(ids), L):
            inp, tgt = full[s : s + L], torch.tensor(ids[s : s + L])
            logp = lm.model(torch.tensor([inp[: len(tgt)]])).logits[0].log_softmax(-1)
            total += logp.gather(-1, tgt[:, None]).sum().item()
    assert got[1] == pytest.approx(total, rel=1e-5)


def gen(lm, prompt, **kw):
    (text,) = lm.generate_until([req("generate_until", prompt, kw)], disable_tqdm=True)
    return text


def test_generate_until_stops_at_stop_strings(runs):
    lm = FreeformerLM(runs["base"], device="cpu")
    free = gen(lm, "def f1(x", until=[], max_gen_toks=24)
    ref = generate(lm.model, torch.tensor([lm.tok_encode("def f1(x")]), 24, temperature=0)
    assert free == lm.tok_decode(ref[0, 8:].tolist())  # greedy = the model's own generate
    stop = next(ch for ch in free[3:] if ch.isascii())  # bytes ≥ 128 decode in context
    calls = []
    hook = lm.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        cut = gen(lm, "def f1(x", until=[stop], max_gen_toks=24)
    finally:
        hook.remove()
    assert cut == free.split(stop, 1)[0] and stop not in cut
    assert len(calls) < 24  # decoding stopped early, not only the text cut


def test_generation_latents_and_sampling_are_per_request(runs):
    lm = loud(FreeformerLM(runs["ft"], device="cpu", prefill="prior", seed=5))
    prompt, H, L = "def f2(x", lm.model.config.latent_bits, lm.max_length
    ids = lm.tok_encode(prompt)
    greedy = gen(lm, prompt, max_gen_toks=16)
    codes = draw_latents(request_seed(5, ids, 0), L, H)[0][: len(ids) + 16]
    ref = generate(lm.model, torch.tensor([ids]), 16, temperature=0, latents=codes[None])
    assert greedy == lm.tok_decode(ref[0, len(ids) :].tolist())
    # sampling: the same text alone or batched with another prompt of the same length
    kw = {"do_sample": True, "temperature": 1.0, "max_gen_toks": 16, "until": []}
    alone = lm.generate_until([req("generate_until", prompt, kw)], disable_tqdm=True)
    both = lm.generate_until(
        [req("generate_until", "def f9(y", kw), req("generate_until", prompt, kw)],
        disable_tqdm=True,
    )
    assert alone[0] == both[1]


TASKS = {
    "ff_mc.yaml": """
        task: ff_mc
        dataset_path: json
        dataset_kwargs:
          data_files: {test: "@DIR@/mc.jsonl"}
          cache_dir: "@DIR@/hf_cache"
        output_type: multiple_choice
        test_split: test
        doc_to_text: "{{question}}"
        doc_to_choice: "{{choices}}"
        doc_to_target: "{{answer}}"
        metric_list:
          - metric: acc
          - metric: acc_norm
        """,
    "ff_gen.yaml": """
        task: ff_gen
        dataset_path: json
        dataset_kwargs:
          data_files: {test: "@DIR@/gen.jsonl"}
          cache_dir: "@DIR@/hf_cache"
        output_type: generate_until
        test_split: test
        doc_to_text: "{{prompt}}"
        doc_to_target: "{{answer}}"
        generation_kwargs: {until: ["\\n"], max_gen_toks: 12, do_sample: false}
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        """,
    "ff_ppl.yaml": """
        task: ff_ppl
        dataset_path: json
        dataset_kwargs:
          data_files: {test: "@DIR@/ppl.jsonl"}
          cache_dir: "@DIR@/hf_cache"
        output_type: loglikelihood_rolling
        test_split: test
        doc_to_text: ""
        doc_to_target: "{{text}}"
        metric_list:
          - metric: word_perplexity
          - metric: byte_perplexity
          - metric: bits_per_byte
        """,
}


def write_tasks(d):
    """Three local lm-eval tasks (multiple choice, generation, perplexity) over JSONL files."""
    import json

    rows = {
        "mc.jsonl": [
            {"question": f"def f{i}(x, y):\n    return x *", "choices": [f" {i}", " 7", " y"],
             "answer": 0} for i in (1, 2, 3, 4)
        ],
        "gen.jsonl": [{"prompt": f"def f{i}(x, y):\n", "answer": f"    return x * {i} + y"}
                      for i in (5, 6, 7)],
        "ppl.jsonl": [{"text": CORPUS[:90]}, {"text": CORPUS[500:800]}],
    }  # fmt: skip
    for name, docs in rows.items():
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in docs))
    for name, text in TASKS.items():
        (d / name).write_text(textwrap.dedent(text).replace("@DIR@", str(d)))
    return d


def test_simple_evaluate_runs_local_tasks(runs, tmp_path):
    tasks = write_tasks(tmp_path)
    lm = FreeformerLM(runs["ft"], device="cpu", latent_mode="encoder", latent_samples=2)
    results = simple_evaluate(
        model=lm, tasks=["ff_mc", "ff_gen", "ff_ppl"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        bootstrap_iters=0, log_samples=True,
    )  # fmt: skip
    res = results["results"]
    assert 0.0 <= res["ff_mc"]["acc,none"] <= 1.0 and "acc_norm,none" in res["ff_mc"]
    assert 0.0 <= res["ff_gen"]["exact_match,none"] <= 1.0
    assert math.isfinite(res["ff_ppl"]["word_perplexity,none"])
    assert res["ff_ppl"]["bits_per_byte,none"] > 0
    assert len(results["samples"]["ff_mc"]) == 4
    assert results["config"]["latent_mode"] == "encoder"  # our get_model_info


def tiny_h1(lm):
    """Swap in an H = 1 model (byte vocabulary) whose codes visibly matter, small enough to
    enumerate every code sequence of a short request."""
    from freeformer.config import ModelConfig
    from freeformer.model import FreeTransformer

    cfg = ModelConfig.preset("debug", latent_bits=1, vocab_size=lm.model.config.vocab_size)
    m = FreeTransformer(cfg, seed=0).eval()
    with torch.no_grad():
        m.post_sampler.weight.mul_(30)
        m.blocks[cfg.inject_layer].attn.wo.weight.mul_(300)
        (m.head.weight if m.head is not None else m.tok_emb.weight).mul_(20)
        m.encoder.readout.weight.mul_(15)
    lm.model = m
    return lm


def enumerated(model, inp, targets, n_ctx):
    """Exact log P(targets[n_ctx−1:] | inp[:n_ctx]) and the old estimand, over 2^T codes."""
    import itertools

    from freeformer.likelihood import token_log_probs

    T = len(inp)
    Z = torch.tensor(list(itertools.product([0, 1], repeat=T)))
    with torch.no_grad():
        lp = token_log_probs(
            model(torch.tensor([inp]).expand(len(Z), -1), latents=Z).logits,
            torch.tensor([targets]).expand(len(Z), -1),
        ).double()
    a, b = lp[:, : n_ctx - 1].sum(1), lp[:, n_ctx - 1 :].sum(1)
    return (
        (torch.logsumexp(a + b, 0) - torch.logsumexp(a, 0)).item(),
        (torch.logsumexp(b, 0) - math.log(len(Z))).item(),
    )


@pytest.mark.parametrize("mode", ["prior", "encoder"])
def test_scores_converge_to_the_enumerated_likelihood(runs, mode):
    """loglikelihood → log P(cont | ctx), loglikelihood_rolling → log P(doc | prefix), both
    within 4 measured standard errors (+1e-3 for the O(1/k) ratio bias) of enumeration; the
    old estimand log E_Z[P(cont | ctx, Z)] lies far outside."""
    ctx, cont, doc = "ret", "urn", "x * 3"
    k, seeds = 2048, range(6)
    lms = [tiny_h1(FreeformerLM(runs["ft"], device="cpu", latent_mode=mode, latent_samples=k,
                                batch_size=k, seed=s)) for s in seeds]  # fmt: skip
    lm = lms[0]
    c_ids, x_ids = lm.tok_encode(ctx), lm.tok_encode(cont)
    exact, old = enumerated(lm.model, (c_ids + x_ids)[:-1], (c_ids + x_ids)[1:], len(c_ids))
    d_ids = [lm.prefix_token_id] + lm.tok_encode(doc)
    exact_doc, _ = enumerated(lm.model, d_ids[:-1], d_ids[1:], 1)
    tols = []
    for want, score in [
        (exact, lambda m: m.loglikelihood([req("loglikelihood", ctx, cont)], True)[0][0]),
        (exact_doc, lambda m: m.loglikelihood_rolling([req("loglikelihood_rolling", doc)],
                                                      True)[0]),
    ]:  # fmt: skip
        vals = torch.tensor([score(m) for m in lms], dtype=torch.float64)
        mean, se = vals.mean().item(), (vals.std() / math.sqrt(len(vals))).item()
        print(f"{mode}: {mean:.4f} ± {se:.4f}, exact {want:.4f} (old estimand {old:.4f})")
        assert se < 0.02
        assert abs(mean - want) < 4 * se + 1e-3
        tols.append(4 * se + 1e-3)
    assert abs(old - exact) > 10 * tols[0]
