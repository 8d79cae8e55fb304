"""lm-eval's own ``hf`` model on a GGUF file, on the offline tasks `freeformer eval
--data-source olmo` uses: the reference that validates our adapter on a real model
(docs/pretrained.md). Same task YAMLs (written by freeformer.evaluation.olmo), same lm-eval
version, same --limit and few-shot settings; only the model differs.

    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 python scripts/hf_reference_eval.py \\
        path/to/SmolLM2-135M-Instruct.Q4_1.gguf --tasks arc_easy,piqa,boolq --limit 200 \\
        --out results/hf-smollm2.json --log-samples
    python scripts/hf_reference_eval.py --compare results/hf-smollm2.json results/base.json

``--compare A B``: two results files written with --log-samples (this script's, and
`freeformer eval ... --log-samples`): accuracies, the largest per-request difference of
log-likelihood and the documents whose correctness differs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def compare(a_path: Path, b_path: Path) -> None:
    a, b = (json.loads(Path(p).read_text()) for p in (a_path, b_path))
    print(
        f"| task | {a.get('model', a_path)} acc | {b.get('model', b_path)} acc | requests | "
        "max abs Δ log-likelihood | documents scored differently |"
    )
    print("|---|---|---|---|---|---|")
    for task in a["results"]:
        if task not in b["results"] or task not in a.get("samples", {}):
            continue
        sa = {s["doc_id"]: s for s in a["samples"][task]}
        sb = {s["doc_id"]: s for s in b["samples"][task]}
        worst, n, differ = 0.0, 0, 0
        for d, s in sa.items():
            for ra, rb in zip(s["resps"], sb[d]["resps"]):
                x = ra[0][0] if isinstance(ra[0], list) else ra[0]
                y = rb[0][0] if isinstance(rb[0], list) else rb[0]
                worst, n = max(worst, abs(float(x) - float(y))), n + 1
            differ += s["acc"] != sb[d]["acc"]
        print(
            f"| {task} | {a['results'][task]['acc,none']:.3f} | "
            f"{b['results'][task]['acc,none']:.3f} | {n} | {worst:.1e} | {differ} |"
        )


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--compare":
        compare(Path(argv[1]), Path(argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--tasks", default="arc_easy,piqa,boolq")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--log-samples",
        action="store_true",
        help="keep every request's log-likelihoods (to compare per document)",
    )
    args = ap.parse_args(argv)

    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    from freeformer.evaluation.olmo import write_olmo_tasks

    torch.set_num_threads(args.threads)
    tasks = [t for t in args.tasks.split(",") if t]
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="hf-ref-olmo-") as d:
        write_olmo_tasks(d, tasks)
        tm = TaskManager(include_path=[d], include_defaults=False)
        gguf = args.gguf.resolve()
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={gguf.parent},gguf_file={gguf.name},dtype=float32,device=cpu",
            tasks=tasks,
            limit=args.limit,
            batch_size=args.batch_size,
            task_manager=tm,
            log_samples=args.log_samples,
        )
    print(make_table(results))
    from lm_eval.utils import handle_non_serializable

    results["model"] = f"transformers ({gguf.name})"
    results["wall_s"] = time.time() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=handle_non_serializable))
    print(f"wrote {args.out} in {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
