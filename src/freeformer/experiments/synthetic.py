"""The paper's synthetic experiment (Section 4.1, Figures 3–4), end to end.

Trains one Free Transformer per κ and the matched baseline on the synthetic task (several
models at a time, one process and one thread each; leftover models of a last round get the
idle cores), then for each model generates groups of
5 sequences from random prompts — "independent" groups (every sequence draws its own code
sequence from the uniform prior, prompt included) and "shared" groups (one code sequence
drawn from the prior and pinned for the whole group), the paper's Figure-4 protocol —
prints the Figure-4 view, scores many groups, reads what Z carries from the posterior
(:mod:`freeformer.experiments.reconstruction`), and writes samples.json, scores.json,
results.md and figure4.png. Each model's training is resumable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from freeformer.errors import UserError

GROUP_SIZE = 5
DEFAULT_KAPPAS = "1/64,1/8,1,8"
# The demo's κ: 2 bits (a κ of the paper's Section 4.2 runs) showed a shared-Z effect above
# 0.3 in more seeds at 1000 steps than κ = 1 bit (docs/synthetic/results.md).
QUICK_KAPPAS = "2"
# The demo trains the shipped config (lr 3e-3) for 1600 steps, the Free Transformer alone
# on every core. Its bar (shared-Z agreement ≥ 0.3 above independent, validity ≥ 0.5) was
# cleared in 6 of seeds 0–9 (the tuning seeds), against 3 of 10 for the previous demo (1000
# steps at lr 4.5e-3 next to the baseline, on the current code). The longer training is
# what moves the effect (+0.26 to +0.65 against +0.15 to +0.42); it misses on validity
# (seeds 6, 7 below 0.5) or just short (+0.26, +0.27). Then 7 of 10 fresh seeds, all three
# misses on validity: docs/synthetic/results.md, "The quick demo". --baseline brings the
# baseline back.
QUICK_OVERRIDES = ("train.max_steps=1600",)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to train: the shipped synthetic config, its steps, and which κ."""

    kappas: tuple[float, ...]
    steps: int
    baseline: bool = True


def parse_kappas(text: str) -> tuple[float, ...]:
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            k = float(Fraction(part))
        except (ValueError, ZeroDivisionError):
            raise UserError(
                f"--kappa-bits: {part!r} is not a number or fraction (e.g. 1/8)"
            ) from None
        if k <= 0:
            raise UserError(f"--kappa-bits: κ must be > 0 bits, got {part}")
        out.append(k)
    if not out:
        raise UserError("--kappa-bits is empty")
    return tuple(out)


def kappa_key(k: float) -> str:
    """κ in bits as the decimal string used in samples.json ("0.015625", "0.125", "1", "8")."""
    return f"{k:g}"


def kappa_label(k: float) -> str:
    f = Fraction(k).limit_denominator(1024)
    return (
        f"{f.numerator}/{f.denominator} bit"
        if f.denominator != 1
        else f"{f.numerator} bit" + ("s" if f.numerator != 1 else "")
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Reproduce the paper's synthetic experiment: train a Free Transformer per "
        "κ and the matched baseline, show Figure 4 in the terminal, score groups "
        "of samples, write samples.json, results.md and figure4.png."
    )
    p.add_argument(
        "--kappa-bits",
        default=None,
        help=f"comma-separated κ in bits (default {DEFAULT_KAPPAS}; --quick: {QUICK_KAPPAS})",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"the few-minute demo: κ = {QUICK_KAPPAS} bits with "
        f"{', '.join(QUICK_OVERRIDES)} on top of the config, on every core, no "
        "baseline (--baseline adds it): sequences that share "
        "one Z agree on where the target goes (or where the noise falls) more "
        "often than sequences that draw their own (docs/synthetic)",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="training steps per model (default: the config's)"
    )
    p.add_argument(
        "--groups",
        type=int,
        default=20,
        help="independent and shared groups of 5 scored per model (default 20, the "
        "minimum for the acceptance tests)",
    )
    p.add_argument(
        "--reconstruction",
        type=int,
        default=RECONSTRUCTION_N,
        help="held-out sequences regenerated from their posterior codes per model "
        f"(default {RECONSTRUCTION_N})",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-baseline", action="store_true", help="skip the matched baseline")
    p.add_argument(
        "--baseline",
        action="store_true",
        help="train the matched baseline with --quick too (the full run always does)",
    )
    p.add_argument(
        "--config", default=None, help="base TOML config (default: configs/synthetic.toml)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads per model (0: 1 when models train in parallel, "
        "else torch's default)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="models trained at the same time, each in its own process (0: one "
        "per CPU core, at most one per model)",
    )
    p.add_argument("--out", default="runs/synthetic", help="output directory")
    p.set_defaults(func=main)


def make_plan(args: argparse.Namespace, config_steps: int) -> Plan:
    kappas = parse_kappas(args.kappa_bits or (QUICK_KAPPAS if args.quick else DEFAULT_KAPPAS))
    steps = args.steps or config_steps
    if steps < 1:
        raise UserError(f"--steps {steps}: expected ≥ 1")
    if args.groups < 1:
        raise UserError(f"--groups {args.groups}: expected ≥ 1")
    if args.reconstruction < 1:
        raise UserError(f"--reconstruction {args.reconstruction}: expected ≥ 1")
    if args.jobs < 0 or args.threads < 0:
        raise UserError(
            f"--jobs {args.jobs} / --threads {args.threads}: expected ≥ 0 (0: automatic)"
        )
    if args.baseline and args.no_baseline:
        raise UserError("--baseline and --no-baseline contradict each other: pick one")
    return Plan(kappas, steps, baseline=args.baseline or not (args.no_baseline or args.quick))


# ---------------------------------------------------------------------------------------
# Training (resumable per model)
# ---------------------------------------------------------------------------------------
def train_model(
    base_cfg,
    run_dir: Path,
    *,
    kappa: float | None,
    steps: int,
    seed: int,
    threads: int,
    quiet: bool = False,
):
    """Train (or resume, or reuse) one model; returns its run directory."""
    from freeformer.checkpoint import list_checkpoints, load_checkpoint
    from freeformer.runconfig import build_run_config
    from freeformer.train import train

    d = base_cfg.to_dict()
    d["model"]["latent"] = kappa is not None
    if kappa is not None:
        d["model"]["free_bits"] = kappa
        # κ cannot exceed H bits per token: κ = 8 bits needs H ≥ 8 (the config's H otherwise).
        d["model"]["latent_bits"] = max(d["model"]["latent_bits"], math.ceil(kappa))
    d["train"].update(max_steps=steps, seed=seed, threads=threads, ckpt_every=max(1, steps // 4))
    d["train"]["warmup_steps"] = min(d["train"]["warmup_steps"], max(1, steps // 10))
    cfg = build_run_config(d)
    found = list_checkpoints(run_dir)
    if found:
        ck = load_checkpoint(found[-1], verify=False)
        if (
            ck.state["config"]["model"] != cfg.model.to_dict()
            or ck.state["config"]["train"]["max_steps"] != steps
        ):
            raise UserError(
                f"{run_dir} holds a run with other settings; remove it or choose another --out"
            )
        if ck.step >= steps:
            print(f"  reusing the finished run in {run_dir}")
            return run_dir
        train(cfg, run_dir, resume=True, quiet=quiet)
    else:
        train(cfg, run_dir, quiet=quiet)
    return run_dir


# ---------------------------------------------------------------------------------------
# Sampling and scoring
# ---------------------------------------------------------------------------------------
def prior_codes(model, n: int, gen: torch.Generator) -> torch.Tensor | None:
    """(n, 66) codes drawn from the uniform prior for every position, prompt included
    (None for a baseline). Figure 4's protocol: both groups read Z from the prior — a fresh
    draw per sequence (blue) or one draw per group (green) — so they differ only in sharing."""
    from freeformer.data.synthetic import SEQ_LEN

    c = model.config
    if not c.latent:
        return None
    return torch.randint(0, c.n_codes, (n, SEQ_LEN), generator=gen)


@torch.no_grad()
def sample_groups(model, n_groups: int, shared: bool, gen: torch.Generator) -> list[list[str]]:
    """n_groups groups of GROUP_SIZE sequences, each group from its own random prompt.

    Independent groups: every sequence draws its own code sequence from the prior; shared
    groups: one prior draw per group, pinned for its GROUP_SIZE sequences (paper Figure 4).
    """
    from freeformer.data.synthetic import BODY, decode, encode, random_prompt
    from freeformer.generate import generate

    prompts = [random_prompt(gen) for _ in range(n_groups)]
    tokens = torch.stack([encode(p) for p in prompts]).repeat_interleave(GROUP_SIZE, 0)
    if shared:
        z = prior_codes(model, n_groups, gen)
        latents = None if z is None else z.repeat_interleave(GROUP_SIZE, 0)
    else:
        latents = prior_codes(model, n_groups * GROUP_SIZE, gen)
    out = generate(model, tokens, BODY, temperature=1.0, latents=latents, generator=gen)
    strings = [decode(row) for row in out.tolist()]
    return [strings[i * GROUP_SIZE : (i + 1) * GROUP_SIZE] for i in range(n_groups)]


@torch.no_grad()
def figure4_panel(model, gen: torch.Generator) -> dict[str, Any]:
    """One random prompt: a blue group (a prior draw of Z per sequence) and two green groups
    (one prior draw of Z each, shared by the group)."""
    from freeformer.data.synthetic import BODY, decode, encode, random_prompt
    from freeformer.generate import generate

    prompt = random_prompt(gen)
    tokens = encode(prompt)[None].expand(GROUP_SIZE, -1)

    def run(latents):
        out = generate(model, tokens, BODY, temperature=1.0, latents=latents, generator=gen)
        return [decode(r) for r in out.tolist()]

    independent = run(prior_codes(model, GROUP_SIZE, gen))
    shared = []
    for _ in range(2):
        shared.append(run(prior_codes(model, 1, gen)))
    return {"prompt": prompt, "independent": independent, "shared": shared}


RECONSTRUCTION_N = 200


def score_model(
    path: Path, n_groups: int, seed: int, n_recon: int = RECONSTRUCTION_N
) -> dict[str, Any]:
    """Figure-4 panel, scored groups, validation metrics and (Free Transformers) the
    reconstruction diagnostic of the model in ``path`` (a run directory or checkpoint)."""
    from freeformer.checkpoint import load_model
    from freeformer.distributed import DistInfo
    from freeformer.experiments.reconstruction import reconstruction
    from freeformer.experiments.scoring import aggregate
    from freeformer.runconfig import RunConfig
    from freeformer.train import build_data
    from freeformer.validation import evaluate

    model, ck = load_model(path)
    gen = torch.Generator().manual_seed(seed + 12345)
    panel = figure4_panel(model, gen)
    independent = sample_groups(model, n_groups, shared=False, gen=gen)
    shared = sample_groups(model, n_groups, shared=True, gen=gen)
    cfg = RunConfig.from_dict(ck.state["config"])
    _, val = build_data(cfg, DistInfo())
    vals = evaluate(
        model,
        val,
        latent=cfg.model.latent,
        n_bits=cfg.model.latent_bits,
        k=2,
        seed=seed,
        device=torch.device("cpu"),
    )
    recon = (
        reconstruction(model, n_recon, torch.Generator().manual_seed(seed + 777))
        if cfg.model.latent
        else None
    )
    return {
        "panel": panel,
        "independent": independent,
        "shared": shared,
        "ind": aggregate(independent),
        "sha": aggregate(shared),
        "val": vals,
        "recon": recon,
        "steps": ck.step,
    }


def train_and_score(
    base_cfg,
    run_dir: Path,
    kappa: float | None,
    steps: int,
    seed: int,
    threads: int,
    n_groups: int,
    quiet: bool = False,
    n_recon: int = RECONSTRUCTION_N,
) -> dict[str, Any]:
    """Train (or reuse) one model, then score it; one unit of work for --jobs."""
    if threads:
        torch.set_num_threads(threads)
    t0, c0 = time.perf_counter(), time.process_time()
    train_model(
        base_cfg, run_dir, kappa=kappa, steps=steps, seed=seed, threads=threads, quiet=quiet
    )
    t1, c1 = time.perf_counter(), time.process_time()
    r = score_model(run_dir, n_groups, seed, n_recon)
    # CPU seconds next to wall seconds: on a shared machine the wall time measures the
    # neighbours too, the CPU time (one thread) what the work itself costs.
    r["train_s"], r["score_s"] = t1 - t0, time.perf_counter() - t1
    r["train_cpu_s"], r["score_cpu_s"] = c1 - c0, time.process_time() - c1
    return r


# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------
def _f(v: Any, nd: int = 3) -> str:
    return "—" if v is None else f"{v:.{nd}f}"


def regime_checks(results: dict[str, dict]) -> list[tuple[str, str, bool | None]]:
    """The acceptance tests of the expected Figure-4 regimes, evaluated on the scores."""

    def get(k):
        return results.get(kappa_key(k))

    checks: list[tuple[str, str, bool | None]] = []

    def pos(r, which):
        return r[which]["position_agreement"] or 0.0

    def jac(r, which):
        return r[which]["noise_jaccard"] or 0.0

    r = get(1 / 64)
    if r:
        d = abs(pos(r, "sha") - pos(r, "ind"))
        checks.append(
            (
                "κ = 1/64 bit",
                f"shared position agreement within 0.1 of independent (|Δ| = {d:.3f})",
                d <= 0.1,
            )
        )
    r = get(1 / 8)
    if r:
        dj = jac(r, "sha") - jac(r, "ind")
        checks.append(
            (
                "κ = 1/8 bit",
                f"shared position agreement ≥ 0.8 ({pos(r, 'sha'):.3f}) "
                f"and noise Jaccard near independent (Δ = {dj:+.3f} ≤ 0.15)",
                pos(r, "sha") >= 0.8 and dj <= 0.15,
            )
        )
    r = get(1)
    if r:
        dj = jac(r, "sha") - jac(r, "ind")
        checks.append(
            (
                "κ = 1 bit",
                f"shared position agreement ≥ 0.8 ({pos(r, 'sha'):.3f}) and "
                f"noise Jaccard ≥ 0.3 above independent (Δ = {dj:+.3f})",
                pos(r, "sha") >= 0.8 and dj >= 0.3,
            )
        )
    r8, r18 = get(8), get(1 / 8)
    if r8:
        v8 = r8["ind"]["validity"]
        if r18:
            v18 = r18["ind"]["validity"]
            checks.append(
                (
                    "κ = 8 bits",
                    f"validity ≥ 20 points below κ = 1/8 bit ({v8:.3f} vs {v18:.3f})",
                    v8 <= v18 - 0.2,
                )
            )
        elif "baseline" in results:
            vb = results["baseline"]["ind"]["validity"]
            checks.append(
                (
                    "κ = 8 bits",
                    f"validity ≥ 20 points below the baseline's "
                    f"({v8:.3f} vs {vb:.3f}; κ = 1/8 bit not run)",
                    v8 <= vb - 0.2,
                )
            )
    # Independent groups must be independent in every model (Figure 4's blue groups).
    worst = max(((pos(r, "ind"), k) for k, r in results.items()), default=None)
    if worst is not None:
        name = "baseline" if worst[1] == "baseline" else f"κ = {kappa_label(float(worst[1]))}"
        checks.append(
            (
                "every model",
                f"independent groups independent: position agreement "
                f"≤ 0.3 (highest {worst[0]:.3f}, {name})",
                worst[0] <= 0.3,
            )
        )
    return checks


def results_table(results: dict[str, dict]) -> str:
    head = (
        "| model | validity ind / shared | position agreement ind / shared | "
        "mean abs Δ position ind / shared | noise Jaccard ind / shared | KL bits/token "
        "| CE prior codes (nats) |\n|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for key, r in results.items():
        name = "baseline" if key == "baseline" else f"κ = {kappa_label(float(key))}"
        i, s, v = r["ind"], r["sha"], r["val"]
        rows.append(
            f"| {name} | {_f(i['validity'])} / {_f(s['validity'])} | "
            f"{_f(i['position_agreement'])} / {_f(s['position_agreement'])} | "
            f"{_f(i['position_abs_diff'], 2)} / {_f(s['position_abs_diff'], 2)} | "
            f"{_f(i['noise_jaccard'])} / {_f(s['noise_jaccard'])} | "
            f"{_f(v.get('kl_bits'))} | {_f(v.get('ce_prior', v.get('ce')))} |"
        )
    return head + "\n".join(rows) + "\n"


PROTOCOL_NOTE = (
    "*ind* = independent groups: every sequence draws its own code sequence from the uniform "
    "prior, prompt positions included; *shared* = one code sequence drawn from the prior for "
    "the group and pinned for its 5 sequences. This is the paper's Figure-4 protocol: the two "
    "groups differ only in sharing Z. (Generation elsewhere in the library takes the prompt's "
    "codes from the encoder, as the paper's Section 3.4 prescribes; here both groups read the "
    "prior so that an encoder run over a 2-character prompt, never seen alone in training, "
    "cannot make the independent groups agree.) Agreements are over pairs of valid sequences "
    "in a group, averaged over groups; see `freeformer.experiments.scoring` and `parse` in "
    "`freeformer.data.synthetic` for the definitions."
)

RECON_NOTE = (
    "Reconstruction: held-out sequences of the training distribution are run through the "
    "encoder, their posterior codes pinned, and each is regenerated from its prompt "
    "(temperature 1). *position kept* = fraction whose regenerated target starts where the "
    "source's does (chance ≈ 1/57); *noise Jaccard* = Jaccard of the '!' positions with the "
    "source (chance ≈ 0.03). The KL (bits per token) splits into *information* (what the "
    "codes say about the sequence, I(S; Z_t)) and *prior mismatch* (KL of the aggregate "
    "posterior to the uniform prior: codes the encoder favours whatever the sequence, free "
    "under token-wise free bits, and how far prior samples lie from what the decoder saw "
    "in training; estimated from 1000 sequences). KL columns by kind: the posterior's KL "
    "by the token that position's code first helps predict (see "
    "`freeformer.experiments.reconstruction`)."
)


def reconstruction_table(results: dict[str, dict]) -> str:
    """Markdown table of the reconstruction diagnostic (empty when no model has a latent)."""
    from freeformer.experiments.reconstruction import KINDS

    rows = []
    for key, r in results.items():
        rec = r.get("recon")
        if not rec:
            continue
        kinds = " | ".join(_f(rec["kl_bits_by_kind"].get(k)) for k in KINDS)
        rows.append(
            f"| κ = {kappa_label(float(key))} | {_f(rec['position_match'], 2)} | "
            f"{_f(rec['noise_jaccard'], 2)} | {_f(rec['validity'], 2)} | "
            f"{_f(rec['kl_bits'])} | {_f(rec.get('information_bits'))} | "
            f"{_f(rec.get('prior_mismatch_bits'))} | {kinds} |"
        )
    if not rows:
        return ""
    head = (
        "| model | position kept | noise Jaccard | validity | KL bits/token | "
        "information | prior mismatch | "
        + " | ".join(f"KL {k}" for k in KINDS)
        + " |\n|"
        + "---|" * (7 + len(KINDS))
        + "\n"
    )
    return head + "\n".join(rows) + "\n"


def plain_summary(results: dict[str, dict]) -> list[str]:
    """One sentence per model saying what sharing Z did to its samples."""
    lines = []
    ref = results.get("baseline", {}).get("ind", {}).get("validity")
    for key, r in results.items():
        i, s = r["ind"], r["sha"]
        dp = (s["position_agreement"] or 0.0) - (i["position_agreement"] or 0.0)
        dj = (s["noise_jaccard"] or 0.0) - (i["noise_jaccard"] or 0.0)
        facts = (
            f"groups sharing one Z put their target at the same place in "
            f"{100 * (s['position_agreement'] or 0):.0f} % of pairs and share noise with "
            f"Jaccard {s['noise_jaccard'] or 0:.2f}, against "
            f"{100 * (i['position_agreement'] or 0):.0f} % and "
            f"{i['noise_jaccard'] or 0:.2f} when each sequence draws its own Z; "
            f"{100 * i['validity']:.0f} % of sequences are well formed"
        )
        if key == "baseline":
            lines.append(
                f"baseline (no latent): {100 * i['validity']:.0f} % of sequences are "
                "well formed; its 'shared' groups are ordinary samples, for reference."
            )
            continue
        name = f"κ = {kappa_label(float(key))}"
        kl = r["val"].get("kl_bits") or 0.0
        broken = i["validity"] < 0.5 or (ref is not None and i["validity"] <= ref - 0.2)
        if broken:
            verdict = (
                "generation breaks: many samples are malformed"
                + (f" ({100 * ref:.0f} % well formed for the baseline)" if ref else "")
                + (
                    f"; Z carries {kl:.1f} bits/token, too much for its prior samples to make sense"
                    if kl > 2
                    else ""
                )
            )
        elif dp >= 0.3 or dj >= 0.3:
            what = " and ".join(
                w
                for w, d in (("where the target goes", dp), ("where the noise falls", dj))
                if d >= 0.3
            )
            verdict = f"the shared latent steers generation: it decides {what}"
        elif dp >= 0.1 or dj >= 0.1:
            verdict = (
                "sharing Z has a weak effect: samples that share it agree more than "
                "independent ones, but less than the 0.3 margin of a clear effect"
            )
        else:
            verdict = "sharing Z changes little: the model behaves like the baseline"
        lines.append(f"{name}: {verdict} ({facts}).")
    return lines


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"


def print_panel(name: str, panel: dict[str, Any]) -> None:
    from freeformer.experiments.figure4 import render_group_ansi

    print(f"\n{name} — prompt {panel['prompt']!r}")
    print("  independent latents (blue):")
    print(render_group_ansi(panel["independent"], "blue"))
    for j, grp in enumerate(panel["shared"], 1):
        print(f"  shared latent #{j} (green):")
        print(render_group_ansi(grp, "green"))


def rounds(
    models: list, jobs: int, threads: int, threads_fixed: bool
) -> list[tuple[list, int, int]]:
    """(models, processes, threads each) per round of parallel training.

    Models are trained ``jobs`` at a time, one thread each; the r = len(models) mod jobs
    left over for a last round would leave cores idle, so (unless --threads fixed the count)
    they get jobs // r threads each. For four κ and the baseline on 2 cores: the four Free
    Transformers two at a time, then the baseline on both cores (2 threads make its step
    1.5× faster: docs/synthetic/results.md, Throughput), instead of the baseline sharing a
    core with two Free Transformers while the other core idles for its last ~6 minutes.
    """
    full = len(models) - len(models) % jobs
    out = [(models[:full], jobs, threads)] if full else []
    rest = models[full:]
    if rest:
        out.append((rest, len(rest), threads if threads_fixed else max(threads, jobs // len(rest))))
    return out


def main(args: argparse.Namespace) -> None:
    from freeformer.runconfig import load_run_config

    t_start = time.perf_counter()
    overrides = QUICK_OVERRIDES if args.quick else ()
    base = (
        load_run_config(path=args.config, overrides=overrides)
        if args.config
        else load_run_config(preset="synthetic", overrides=overrides)
    )
    plan = make_plan(args, base.train.max_steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models: list[tuple[str, float | None]] = [(kappa_key(k), k) for k in plan.kappas]
    if plan.baseline:
        models.append(("baseline", None))
    # One model per core, one torch thread each: two 1-thread processes do 2× the work of one,
    # one 2-thread process 1.5–1.7× (docs/synthetic/results.md, Throughput).
    # More processes than cores is slower: five models at once on 2 cores took 199 s against
    # 182.5 s two at a time (200 steps each; each model's CPU time grew by a fifth from the
    # time-sharing), measured in docs/synthetic/results.md.
    jobs = args.jobs or min(os.cpu_count() or 1, len(models))
    threads = args.threads or (1 if jobs > 1 else 0)
    if threads:
        torch.set_num_threads(threads)
    schedule = rounds(models, jobs, threads, args.threads > 0) if jobs > 1 else []
    how = "; ".join(f"{len(b)} model(s) {n} at a time, {t} thread(s) each" for b, n, t in schedule)
    print(
        f"synthetic experiment: {len(models)} models × {plan.steps} steps → {out} "
        f"({how or f'one at a time, {threads or torch.get_num_threads()} thread(s)'})"
    )

    def name_of(kappa):
        return "baseline" if kappa is None else f"κ = {kappa_label(kappa)}"

    def work(key, kappa, quiet, n_threads=threads):
        run_dir = out / "runs" / ("baseline" if kappa is None else f"kappa_{key}")
        return (
            base,
            run_dir,
            kappa,
            plan.steps,
            args.seed,
            n_threads,
            args.groups,
            quiet,
            args.reconstruction,
        )

    results: dict[str, dict] = {}
    if jobs == 1:
        for key, kappa in models:
            print(f"\n[{name_of(kappa)}] training")
            results[key] = train_and_score(*work(key, kappa, False))
            print_panel(name_of(kappa), results[key]["panel"])
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        print("training in parallel; a line per model as it finishes")
        for batch, n_jobs, n_threads in schedule:
            with cf.ProcessPoolExecutor(n_jobs, mp_context=mp.get_context("spawn")) as pool:
                futures = {
                    pool.submit(train_and_score, *work(key, kappa, True, n_threads)): (key, kappa)
                    for key, kappa in batch
                }
                for fut in cf.as_completed(futures):
                    key, kappa = futures[fut]
                    r = results[key] = fut.result()
                    print(
                        f"  [{name_of(kappa)}] trained in {r['train_s'] / 60:.1f} min "
                        f"({n_threads} thread(s)), scored in {r['score_s'] / 60:.1f} min "
                        f"({time.perf_counter() - t_start:.0f} s since start)",
                        flush=True,
                    )
        results = {key: results[key] for key, _ in models}
        for key, kappa in models:
            print_panel(name_of(kappa), results[key]["panel"])
    runtime = time.perf_counter() - t_start

    table = results_table(results)
    recon = reconstruction_table(results)
    checks = regime_checks(results)
    print("\n" + table)
    if recon:
        print(recon)
    print("What you are looking at:")
    for line in plain_summary(results):
        print("  " + line)
    print("\nExpected regimes of the paper's Figure 4:")
    for who, what, ok in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {who}: {what}")
    print(f"\ntotal runtime {runtime / 60:.1f} min")

    samples = {
        k: {"independent": r["independent"], "shared": r["shared"]} for k, r in results.items()
    }
    (out / "samples.json").write_text(json.dumps(samples, indent=1))
    command = (
        "freeformer " + " ".join(sys.argv[1:])
        if sys.argv[1:2] == ["synthetic"]
        else f"freeformer synthetic (args: {vars(args)})"
    )
    md = [
        "# Synthetic experiment (paper Section 4.1, Figure 4)\n",
        f"Command: `{command}`  \nRuntime: {runtime / 60:.1f} min "
        f"({how or 'one model at a time'})  \nMachine: {machine()}  \n"
        f"Steps per model: {plan.steps}; groups scored per model: {args.groups} independent "
        f"+ {args.groups} shared, {GROUP_SIZE} sequences each (temperature 1).\n",
        "## Scores\n",
        table,
        "\n" + PROTOCOL_NOTE + "\n",
    ]
    if recon:
        md += [
            "## What Z carries (reconstruction from posterior codes)\n",
            recon,
            "\n" + RECON_NOTE + "\n",
        ]
    md += ["## In plain words\n"] + [f"- {line}" for line in plain_summary(results)]
    md += ["\n## Expected regimes (acceptance tests)\n"]
    md += [f"- {'PASS' if ok else 'FAIL'} — {who}: {what}" for who, what, ok in checks]
    md.append("\n![Figure 4](figure4.png)\n")
    (out / "results.md").write_text("\n".join(md) + "\n")
    (out / "scores.json").write_text(
        json.dumps(
            {
                k: {
                    "ind": r["ind"],
                    "sha": r["sha"],
                    "val": r["val"],
                    "recon": r["recon"],
                    "steps": r["steps"],
                    **{k: r.get(k) for k in ("train_s", "score_s", "train_cpu_s", "score_cpu_s")},
                }
                for k, r in results.items()
            },
            indent=1,
        )
    )
    panels = {
        ("baseline" if k == "baseline" else f"κ = {kappa_label(float(k))}"): r["panel"]
        for k, r in results.items()
    }
    written = [out / "samples.json", out / "scores.json", out / "results.md"]
    try:
        from freeformer.experiments.figure4 import plot_figure4

        written.append(plot_figure4(panels, out / "figure4.png"))
    except UserError as e:  # matplotlib missing: the rest is still written
        print(f"note: figure4.png not written ({e})")
    print("wrote " + ", ".join(str(w) for w in written))
