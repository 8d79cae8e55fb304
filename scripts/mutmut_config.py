"""mutmut 2 hook used by scripts/mutation.sh (copied into the scratch tree it runs in).

Skips mutants that can only change the wording of a user-facing message: lines that raise
an error, and continuation lines that are nothing but a string literal. Tests check such
messages by substring ("one line naming X"), so every change of wording would "survive"
and bury the mutants that matter. Docstrings are never mutated by mutmut itself.
"""

import re

_MESSAGE_ONLY = re.compile(r"""^[rRfFbB]{0,2}("|').*\1[)\]]*,?[)\]]*( from None)?$""")


def pre_mutation(context):
    line = context.current_source_line.strip()
    if line.startswith("raise ") or _MESSAGE_ONLY.match(line):
        context.skip = True
