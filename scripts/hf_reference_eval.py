"""lm-eval's own ``hf`` model on a GGUF file, on the offline tasks `freeformer eval
--data-source olmo` uses: the reference that validates our adapter on a real model
(docs/pretrained.md). Same task YAMLs (written by freeformer.evaluation.olmo), same lm-eval
version, same --limit and few-shot settings; only the model differs.

    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 python scripts/hf_reference_eval.py \\
        path/to/SmolLM2-135M-Instruct.Q4_1.gguf --tasks arc_easy,piqa,boolq --limit 200 \\
        --out results/hf-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--tasks", default="arc_easy,piqa,boolq")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--log-samples", action="store_true",
                    help="keep every request's log-likelihoods (to compare per document)")
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
            model_args=f"pretrained={gguf.parent},gguf_file={gguf.name},dtype=float32,"
                       "device=cpu",
            tasks=tasks, limit=args.limit, batch_size=args.batch_size, task_manager=tm,
            log_samples=args.log_samples)
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
