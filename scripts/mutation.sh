#!/usr/bin/env bash
# Mutation testing with mutmut 2 (pip install -e '.[mutation]'); not part of CI: see
# docs/testing.md for when to run it, the last scores and every surviving mutant.
#
#   scripts/mutation.sh                      # every module below, most important first
#   scripts/mutation.sh generate runconfig   # some of them
#
# Each module is mutated in a scratch copy of src/ and tests/ (mutmut 2 edits the file in
# place; a killed run must never leave a mutant in your tree) and checked only by its fast
# tests, one mutant at a time, in one process (OMP_NUM_THREADS=1). Results go to
# mutation-results/MODULE.txt: the score and the diff of every surviving mutant.
# Environment: PYTHON (default .venv/bin/python), OUT (default mutation-results), BUDGET
# (seconds per module, default none: the mutants not reached are reported as untested),
# KEEP=1 keeps the scratch copy (re-check one mutant there: mutmut run ID).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
MUTMUT="$PY -m mutmut"
OUT=${OUT:-$ROOT/mutation-results}
mkdir -p "$OUT"

R=tests/test_regressions.py
P=tests/test_properties.py
C=tests/test_contracts.py
declare -A FILE TESTS
FILE[generate]=src/freeformer/generate.py
TESTS[generate]="tests/test_generate.py $R::test_eos_pads_each_row_from_its_own_first_eos_and_only_then $R::test_sampling_frequencies_follow_the_tempered_softmax $R::test_tempered_top_k_renormalises_the_kept_tokens $P::test_top_k_keeps_exactly_the_k_largest $P::test_top_p_keeps_the_smallest_prefix_reaching_p $C"
FILE[latent]=src/freeformer/latent.py
TESTS[latent]="$P::test_codes_to_bits_is_the_binary_expansion $P::test_sample_codes_sets_exactly_the_bits_whose_uniform_is_below_p $R::test_kl_bits_is_the_exact_kl_per_token_in_bits_and_elbo_adds_it tests/test_latent.py $C tests/test_model.py"
FILE[runconfig]=src/freeformer/runconfig.py
TESTS[runconfig]="$R::test_override_applies_whether_or_not_the_toml_has_its_section $R::test_cli_override_of_a_section_missing_from_the_file $P::test_overrides_apply_and_config_round_trips_through_toml tests/test_cli.py::test_bad_train_input tests/test_cli.py::test_malformed_and_unknown_config tests/test_cli.py::test_config_prints_a_round_trippable_toml tests/test_train.py::test_every_shipped_config_parses tests/test_runconfig.py $C"
FILE[checkpoint]=src/freeformer/checkpoint.py
TESTS[checkpoint]="$R::test_checkpoint_interrupted_mid_write_is_never_chosen $R::test_resume_after_a_crash_mid_checkpoint_continues_from_the_last_complete_one tests/test_checkpoint.py tests/test_cli.py::test_checkpoint_errors tests/test_cli.py::test_mismatched_checkpoint_weights tests/test_train.py::test_resume_is_bit_identical_to_uninterrupted tests/test_train.py::test_keep_last_prunes_old_checkpoints $C"
FILE[data/loader]=src/freeformer/data/loader.py
TESTS[data/loader]="$R::test_seeds_are_independent_streams_not_shifted_copies tests/test_data.py $C"
FILE[likelihood]=src/freeformer/likelihood.py
TESTS[likelihood]="tests/test_likelihood.py $R::test_kl_bits_is_the_exact_kl_per_token_in_bits_and_elbo_adds_it $R::test_elbo_is_ce_under_the_encoder_codes_plus_kl_on_a_deterministic_posterior tests/test_train.py::test_importance_sampled_nll_matches_enumeration $C"
FILE[train]=src/freeformer/train.py
TESTS[train]="tests/test_train.py $R $C"
FILE[pretrained/convert]=src/freeformer/pretrained/convert.py
TESTS[pretrained/convert]="tests/test_convert.py $C"
ORDER=(generate latent runconfig checkpoint data/loader likelihood train pretrained/convert)  # importance

mods=("$@")
[ ${#mods[@]} -eq 0 ] && mods=("${ORDER[@]}")
for m in "${mods[@]}"; do
  [ -n "${FILE[$m]:-}" ] || { echo "unknown module $m; choose from: ${ORDER[*]}" >&2; exit 2; }
done

for m in "${mods[@]}"; do
  name=${m//\//.}
  scratch=$(mktemp -d "${TMPDIR:-/tmp}/mutation-$name.XXXXXX")
  cp -r "$ROOT/src" "$ROOT/tests" "$ROOT/pyproject.toml" "$scratch/"
  cp "$ROOT/scripts/mutmut_config.py" "$scratch/"
  find "$scratch" -name __pycache__ -prune -exec rm -rf {} +
  # Test files a module lists that do not exist (yet) are dropped, not an error.
  tests=$(cd "$ROOT" && for t in ${TESTS[$m]}; do [ -e "${t%%::*}" ] && printf '%s ' "$t"; done)
  echo "== $m: mutating ${FILE[$m]} against: $tests"
  start=$(date +%s)
  # A fork server holds torch imported; each mutant's tests run in a fresh child of it.
  export PYTHONDONTWRITEBYTECODE=1 OMP_NUM_THREADS=1
  OMP_NUM_THREADS=1 "$PY" "$ROOT/scripts/mutation_runner.py" serve "$scratch/runner.sock" \
    "$scratch/last-test-run.log" &
  server=$!
  for _ in $(seq 600); do [ -S "$scratch/runner.sock" ] && break; sleep 0.1; done
  # BUDGET=SECONDS time-boxes each module: the mutants not reached are reported untested.
  (cd "$scratch" && PYTHONPATH="$scratch/src" timeout -k 10 "${BUDGET:-0}" $MUTMUT run \
     --paths-to-mutate "${FILE[$m]}" --tests-dir tests --simple-output --no-progress \
     --test-time-multiplier 3 --test-time-base 10 \
     --runner "$PY $ROOT/scripts/mutation_runner.py run $scratch/runner.sock -- -x -q -p no:cacheprovider $tests") || true
  kill "$server" 2>/dev/null || true
  secs=$(( $(date +%s) - start ))
  (cd "$scratch" && "$PY" - "$m" "${FILE[$m]}" "$secs" "$tests" <<'PY'
import sqlite3, subprocess, sys
m, path, secs, tests = sys.argv[1:]
db = sqlite3.connect(".mutmut-cache")
rows = db.execute("SELECT m.id, m.status, l.line_number FROM Mutant m JOIN Line l ON m.line = l.id"
                  " JOIN SourceFile f ON l.sourcefile = f.id WHERE f.filename = ?", (path,)).fetchall()
count = {}
for _, s, _ in rows:
    count[s] = count.get(s, 0) + 1
# ok_suspicious: killed, but slower than the baseline allows for (a loaded machine).
killed = count.get("ok_killed", 0) + count.get("ok_suspicious", 0)
bad = {s: n for s, n in count.items() if s.startswith("bad_")}
tested = killed + sum(bad.values())
print(f"{m}: {killed}/{tested} killed ({100 * killed / max(tested, 1):.1f} %), "
      f"{count.get('skipped', 0)} skipped (message text), {count.get('untested', 0)} untested; "
      f"statuses {dict(sorted(count.items()))}; {secs} s; tests: {tests}")
for mid, s, line in sorted(rows, key=lambda r: r[2]):
    if s.startswith("bad_"):
        diff = subprocess.run([sys.executable, "-m", "mutmut", "show", str(mid)],
                              capture_output=True, text=True).stdout
        body = "\n".join(ln for ln in diff.splitlines() if ln[:1] in "+-@" and ln[:3] not in ("---", "+++"))
        print(f"\n# mutant {mid} ({s}) line {line + 1}\n{body}")
PY
  ) > "$OUT/$name.txt" 2>&1 || true
  head -1 "$OUT/$name.txt"
  if [ -n "${KEEP:-}" ]; then echo "   scratch copy kept: $scratch"; else rm -rf "$scratch"; fi
done
