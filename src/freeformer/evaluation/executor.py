"""Run model-written Python in a throw-away subprocess, for HumanEval(+) / MBPP pass@1.

Model output is untrusted code. Nothing here runs it unless the caller passes
``allow_code_execution=True`` (the CLI's ``--allow-code-execution``), and then each program runs:

* as ``python -I`` (isolated: no user site, no ``PYTHON*`` variables, no script dir on the path)
  with a minimal environment, stdin closed, in a fresh temporary directory that is its cwd,
  ``HOME`` and ``TMPDIR`` and is deleted afterwards;
* in a new session (its own process group), so a wall-clock timeout kills it and any children;
* under resource limits set inside the child before the program is compiled: address space
  (``RLIMIT_AS``), CPU seconds, size of files written (also bounds captured output), no core
  files and a cap on new processes (``RLIMIT_NPROC``; the kernel ignores it for root, so
  only outside the sandbox is a root caller's program without one).

On Linux each program also runs in its own user, mount, network, PID and IPC namespaces
(:mod:`freeformer.evaluation.sandbox`; unprivileged, no root, daemon or ``bwrap`` needed): the
whole file system is read-only except its own directory (a fresh tmpfs), the homes (``/root``,
``/home``, ``$HOME``), ``/tmp``, ``/run`` and the caller's working directory are hidden, the only
network interface is its own loopback, it sees only its own processes, holds no capability, and
a program started by root runs as ``nobody``. docs/evaluation.md lists what this does not stop.

Where the kernel refuses namespaces (containers that forbid them, other systems), programs run
as above without the namespaces (the *fallback*), with the calls that delete, rename or
re-permission files, kill processes or start programs replaced by ones that raise; one warning
(:class:`SandboxUnavailableWarning`) names what is not enforced. :data:`SANDBOX_ENV_VAR`
chooses: ``auto`` (default: sandbox if possible, else fallback), ``off`` (force the fallback),
``require`` (a :class:`UserError` instead of the fallback; ``freeformer eval --require-sandbox``).
Whether the sandbox works is probed once per process (one trivial program).

Outcome (``ExecResult.status``): ``passed`` (ran to the end), ``failed`` (an ``assert`` failed,
or the program called ``exit()`` before its tests finished), ``timeout`` (wall clock or CPU
limit), ``memory`` (``MemoryError`` or killed for memory), ``error`` (any other exception,
including a ``SyntaxError``, or the harness could not run it).

lm-eval integration: the task YAMLs in ``freeformer/evaluation/task_yamls`` (and those
written by :func:`freeformer.evaluation.olmo.write_olmo_tasks`) score code tasks through
:func:`lm_eval_pass_at_1`. lm-eval runs metrics inside ``simple_evaluate``, where no flag can be
passed, so the opt-in travels in the environment variable :data:`ALLOW_ENV_VAR` (set it to
``1``, as ``--allow-code-execution`` does) in addition to lm-eval's own
``confirm_run_unsafe_code=True`` gate for tasks marked ``unsafe_code``.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from freeformer.errors import UserError
from freeformer.evaluation.sandbox import SETUP_FAILED, SETUP_PREFIX

STATUSES = ("passed", "failed", "timeout", "memory", "error")
ALLOW_ENV_VAR = "FREEFORMER_ALLOW_CODE_EXECUTION"
SANDBOX_ENV_VAR = "FREEFORMER_SANDBOX"
SANDBOX_SETTINGS = ("auto", "off", "require")
NOT_ENFORCED = (
    "read-only file system, hidden home directories, no network, separate PID and IPC "
    "namespaces are NOT enforced; only resource limits and disabled destructive os/shutil/"
    "subprocess calls"
)
_SANDBOX_SCRIPT = str(Path(__file__).with_name("sandbox.py"))
# Loads sandbox.py as a module, not as a script, so that its cached bytecode is used (compiling
# it costs ~7 ms a program); ``-I`` keeps PYTHONPATH out, hence the path.
_SANDBOX_LAUNCHER = (
    "import sys, importlib.util as u; s = u.spec_from_file_location('freeformer_sandbox', "
    "sys.argv[1]); m = u.module_from_spec(s); s.loader.exec_module(m); m.main(sys.argv[2:])"
)
OPT_IN_MESSAGE = "model output is untrusted code; pass --allow-code-execution to run it"

# Exit codes the bootstrap uses to report how the program ended.
_EXIT_ASSERT, _EXIT_MEMORY, _EXIT_ERROR, _EXIT_SYSEXIT = 70, 71, 72, 73

# Runs in the child: set limits (irreversibly lowering the hard ones), then compile and run the
# program with a clean ``__main__`` namespace. ``os._exit`` skips atexit handlers and does not
# wait for threads the program left running.
_BOOTSTRAP = (
    f"_ASSERT, _MEMORY, _ERROR, _SYSEXIT = {_EXIT_ASSERT}, {_EXIT_MEMORY}, {_EXIT_ERROR}, {_EXIT_SYSEXIT}"
    + r"""
import os, resource, sys
def _limit(which, soft, hard=None):
    hard = soft if hard is None else hard
    _, old_hard = resource.getrlimit(which)
    if old_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, old_hard), min(hard, old_hard)
    try:
        resource.setrlimit(which, (soft, hard))
    except (ValueError, OSError):
        pass
_path, _mem, _cpu, _fsize = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
_mode = sys.argv[5]
_limit(resource.RLIMIT_AS, _mem)
_limit(resource.RLIMIT_CPU, _cpu, _cpu + 1)
_limit(resource.RLIMIT_FSIZE, _fsize)
_limit(resource.RLIMIT_CORE, 0)
# Root ignores RLIMIT_NPROC; in the sandbox the uid is root only inside the user namespace.
if hasattr(resource, "RLIMIT_NPROC") and (os.getuid() != 0 or _mode == "sandbox") and os.path.isdir("/proc"):
    _uid = os.getuid()
    _n = 0
    for _p in os.listdir("/proc"):
        try:
            _n += _p.isdigit() and os.stat("/proc/" + _p).st_uid == _uid
        except OSError:
            pass
    _limit(resource.RLIMIT_NPROC, _n + 16)
with open(_path, encoding="utf-8") as _f:
    _source = _f.read()
del sys.argv[1:]
if _mode == "guard":
    # No sandbox: make the calls that delete, rename, re-permission files, kill processes or start
    # other programs raise instead (advisory only: ctypes or open() still reach everything).
    # shutil and subprocess go through these; patching them here spares importing both (~40 ms).
    import _posixsubprocess
    def _disabled(name):
        def _refuse(*args, **kwargs):
            raise PermissionError(f"{name} is disabled outside the sandbox")
        return _refuse
    for _mod, _names in (
        (os, "remove unlink rmdir removedirs rename renames replace truncate chmod fchmod lchmod "
             "chown fchown lchown chroot chflags lchflags link symlink mkfifo mknod kill killpg "
             "system popen putenv unsetenv setuid setgid seteuid setegid setreuid setregid "
             "setresuid setresgid setgroups execv execve execl execle execlp execlpe execvp execvpe "
             "spawnl spawnle spawnlp spawnlpe spawnv spawnve spawnvp spawnvpe posix_spawn "
             "posix_spawnp forkpty"),
        (_posixsubprocess, "fork_exec"),  # subprocess binds it when first imported
    ):
        for _n in _names.split():
            if hasattr(_mod, _n):
                setattr(_mod, _n, _disabled(f"{_mod.__name__}.{_n}"))
def _done(code):
    for _s in (sys.stdout, sys.stderr):
        try:
            _s.flush()
        except Exception:
            pass
    os._exit(code)
try:
    exec(compile(_source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
except AssertionError:
    import traceback  # only when needed: importing it costs more than starting Python
    traceback.print_exc()
    _done(_ASSERT)
except MemoryError:
    sys.stderr.write("MemoryError\n")
    _done(_MEMORY)
except SystemExit as _e:
    sys.stderr.write(f"SystemExit({_e.code!r})\n")
    _done(_SYSEXIT)
except BaseException:
    import traceback
    traceback.print_exc()
    _done(_ERROR)
_done(0)
"""
)

_MEMORY_MARKERS = ("MemoryError", "Cannot allocate memory", "out of memory", "std::bad_alloc")


class UntrustedCodeWarning(UserWarning):
    """Emitted when model-written code is about to be executed."""


class SandboxUnavailableWarning(UserWarning):
    """Emitted when programs run without the namespace sandbox (the fallback)."""


@dataclass(frozen=True)
class ExecResult:
    """How one program ended. ``detail`` is a one-line reason; outputs are truncated."""

    status: str
    detail: str = ""
    stdout: str = ""
    stderr: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def require_opt_in(allow_code_execution: bool) -> None:
    """Raise unless the caller opted in to running model code; warn when it did."""
    if not allow_code_execution:
        raise UserError(OPT_IN_MESSAGE)
    warnings.warn(
        "executing model-generated code in a subprocess with resource limits (in Linux "
        "namespaces where available: see freeformer.evaluation.executor)",
        UntrustedCodeWarning,
        stacklevel=3,
    )


def opt_in_from_env() -> bool:
    """True when :data:`ALLOW_ENV_VAR` is set to ``1`` (see the module docstring)."""
    return os.environ.get(ALLOW_ENV_VAR, "") == "1"


_probe_lock = threading.Lock()
_probe: dict[str, str | None] = {}


def sandbox_unavailable_reason() -> str | None:
    """Why the namespace sandbox cannot run here, or None when it can (probed once, cached)."""
    if not sys.platform.startswith("linux"):
        return f"no Linux namespaces on {sys.platform}"
    with _probe_lock:
        if "reason" not in _probe:
            r = _run("pass", **_DEFAULT_LIMITS, sandbox=True)
            _probe["reason"] = None if r.passed else (r.detail or r.status)
        return _probe["reason"]


def sandbox_setting() -> str:
    """:data:`SANDBOX_ENV_VAR`: ``auto`` (default), ``off`` (force the fallback) or ``require``."""
    value = os.environ.get(SANDBOX_ENV_VAR, "") or "auto"
    if value not in SANDBOX_SETTINGS:
        raise UserError(
            f"{SANDBOX_ENV_VAR}={value!r} is not a sandbox setting; use one of "
            f"{', '.join(SANDBOX_SETTINGS)}"
        )
    return value


def use_sandbox() -> bool:
    """True: programs run in the namespace sandbox; False: the fallback (warn about it).

    Raises :class:`UserError` when the setting is ``require`` and the sandbox is unavailable.
    """
    setting = sandbox_setting()
    if setting == "off":
        return False
    reason = sandbox_unavailable_reason()
    if reason is None:
        return True
    if setting == "require":
        raise UserError(
            f"the sandbox for model-written code is unavailable ({reason}); run where "
            f"unprivileged user namespaces are allowed, or drop --require-sandbox "
            f"({SANDBOX_ENV_VAR}=require) to accept the weaker fallback"
        )
    return False


def fallback_warning() -> str:
    """The one-line warning of the fallback (names what is not enforced)."""
    if sandbox_setting() == "off":
        why = f"disabled by {SANDBOX_ENV_VAR}=off"
    else:
        why = sandbox_unavailable_reason() or "unknown"
    return (
        f"running model-written (untrusted) code WITHOUT the sandbox ({why}): {NOT_ENFORCED} "
        "(--require-sandbox makes this an error)"
    )


def _prepare(allow_code_execution: bool) -> bool:
    """Opt-in check, then the mode: True for the sandbox; warns once about the fallback."""
    require_opt_in(allow_code_execution)
    sandbox = use_sandbox()
    if not sandbox:
        warnings.warn(fallback_warning(), SandboxUnavailableWarning, stacklevel=3)
    return sandbox


def _tail(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return text if size <= limit else "[...]" + text


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _classify(code: int, stderr: str, killed: bool, timeout_s: float, memory_mb: int):
    """Map an exit status to ``(status, detail)``."""
    last = _last_line(stderr)
    if killed:
        return "timeout", f"killed after {timeout_s:g} s wall clock"
    if code == 0:
        return "passed", ""
    if code == _EXIT_ASSERT:
        return "failed", last or "AssertionError"
    if code == _EXIT_SYSEXIT:
        return "failed", f"program called exit before finishing: {last}"
    if code == _EXIT_MEMORY or any(m in stderr for m in _MEMORY_MARKERS):
        return "memory", f"out of memory (limit {memory_mb} MB): {last or 'MemoryError'}"
    if code == -signal.SIGXCPU:
        return "timeout", "CPU time limit exceeded"
    if code == -signal.SIGKILL:
        # Not killed by us: the CPU hard limit (if SIGXCPU was caught) or the kernel's OOM killer.
        return "memory", "killed by SIGKILL (likely out of memory)"
    if code == -signal.SIGXFSZ:
        return "error", "file size limit exceeded"
    if code < 0:
        return "error", f"killed by signal {signal.Signals(-code).name}"
    return "error", last or f"exit code {code}"


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_program(
    source: str,
    *,
    allow_code_execution: bool,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    cpu_s: float | None = None,
    file_mb: int = 16,
    max_output_chars: int = 4000,
) -> ExecResult:
    """Run ``source`` as a Python program in a sandboxed subprocess (see the module docstring).

    ``timeout_s`` is wall clock; ``cpu_s`` defaults to it (rounded up); ``memory_mb`` caps the
    address space (Python itself needs ~30 MB); ``file_mb`` caps any file written, including
    captured output, of which the last ``max_output_chars`` characters are kept.
    """
    sandbox = _prepare(allow_code_execution)
    return _run(source, timeout_s, memory_mb, cpu_s, file_mb, max_output_chars, sandbox=sandbox)


_DEFAULT_LIMITS = {
    "timeout_s": 10.0, "memory_mb": 1024, "cpu_s": None, "file_mb": 16, "max_output_chars": 4000,
}  # fmt: skip


def _hidden_extra() -> str:
    """The caller's home and working directory, which the sandbox hides (os.pathsep-joined)."""
    paths = [os.path.expanduser("~")]
    try:
        paths.append(os.getcwd())
    except OSError:
        pass
    return os.pathsep.join(p for p in paths if os.path.isabs(p))


def _run(
    source, timeout_s, memory_mb, cpu_s, file_mb, max_output_chars, *, sandbox: bool
) -> ExecResult:
    if timeout_s <= 0 or memory_mb <= 0 or file_mb <= 0:
        raise UserError(
            f"execution limits must be positive (timeout_s={timeout_s}, memory_mb={memory_mb}, "
            f"file_mb={file_mb})"
        )
    cpu = max(1, math.ceil(cpu_s if cpu_s is not None else timeout_s))
    with tempfile.TemporaryDirectory(prefix="freeformer-exec-", ignore_cleanup_errors=True) as tmp:
        root = Path(tmp)
        work = root / "work"
        work.mkdir()
        program = root / "program.py"
        program.write_text(source, encoding="utf-8")
        out_path, err_path = root / "stdout.txt", root / "stderr.txt"
        env = {
            "PATH": os.defpath,
            "HOME": str(work),
            "TMPDIR": str(work),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        limits = [str(memory_mb << 20), str(cpu), str(file_mb << 20)]
        if sandbox:
            args = [sys.executable, "-I", "-c", _SANDBOX_LAUNCHER, _SANDBOX_SCRIPT, str(work),
                    str(program), _hidden_extra(), _BOOTSTRAP, *limits, "sandbox"]  # fmt: skip
        else:
            args = [sys.executable, "-I", "-c", _BOOTSTRAP, str(program), *limits, "guard"]
        killed = False
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                proc = subprocess.Popen(
                    args,
                    cwd=work,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                )
            except OSError as exc:
                return ExecResult("error", f"could not start the interpreter: {exc}")
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                killed = True
                _kill_group(proc.pid)
                code = proc.wait()
            finally:
                _kill_group(proc.pid)  # children the program left behind
        stdout = _tail(out_path, max_output_chars)
        stderr = _tail(err_path, max_output_chars)
    last = _last_line(stderr)
    if sandbox and code == SETUP_FAILED and last.startswith(SETUP_PREFIX):
        return ExecResult("error", f"sandbox setup failed: {last[len(SETUP_PREFIX):].strip()}",
                          stdout, stderr)  # fmt: skip
    status, detail = _classify(code, stderr, killed, timeout_s, memory_mb)
    return ExecResult(status, detail, stdout, stderr)


def run_programs(
    sources: Sequence[str],
    *,
    allow_code_execution: bool,
    workers: int | None = None,
    **limits,
) -> list[ExecResult]:
    """Run many programs, each in its own subprocess, ``workers`` at a time; results in order."""
    sandbox = _prepare(allow_code_execution)
    n = workers if workers is not None else min(4, os.cpu_count() or 1)
    if n < 1:
        raise UserError(f"workers must be >= 1, got {n}")
    opts = {**_limits(limits), "sandbox": sandbox}
    if n == 1 or len(sources) <= 1:
        return [_run(s, **opts) for s in sources]
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(lambda s: _run(s, **opts), sources))


def _limits(limits: dict) -> dict:
    unknown = set(limits) - set(_DEFAULT_LIMITS)
    if unknown:
        raise TypeError(f"unknown execution limits: {sorted(unknown)}")
    return {**_DEFAULT_LIMITS, **limits}


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program HumanEval runs: the prompt, the completion, the tests, ``check(entry)``."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


def mbpp_program(completion: str, tests: str | Sequence[str], setup_code: str = "") -> str:
    """The program MBPP runs: optional setup, the completion, then the ``assert`` lines."""
    body = tests if isinstance(tests, str) else "\n".join(tests)
    head = f"{setup_code}\n" if setup_code else ""
    return f"{head}{completion}\n\n{body}\n"


def check_humaneval(
    prompt: str,
    completion: str,
    test: str,
    entry_point: str,
    *,
    allow_code_execution: bool,
    **limits,
) -> ExecResult:
    """Run a HumanEval(+) problem's tests against ``prompt + completion``."""
    return run_program(
        humaneval_program(prompt, completion, test, entry_point),
        allow_code_execution=allow_code_execution,
        **limits,
    )


def check_mbpp(
    completion: str,
    tests: str | Sequence[str],
    *,
    setup_code: str = "",
    allow_code_execution: bool,
    **limits,
) -> ExecResult:
    """Run MBPP's ``assert`` lines (a list, or one string of code) against ``completion``."""
    return run_program(
        mbpp_program(completion, tests, setup_code),
        allow_code_execution=allow_code_execution,
        **limits,
    )


def pass_at_1(results: Iterable[ExecResult | bool]) -> float:
    """Fraction of programs that passed (one sample per problem: pass@1)."""
    flags = [r.passed if isinstance(r, ExecResult) else bool(r) for r in results]
    if not flags:
        raise ValueError("pass_at_1 needs at least one result")
    return sum(flags) / len(flags)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` passed (Chen et al. 2021, Eq. 1)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # 1 - C(n-c, k) / C(n, k), as a product to stay in floating point range.
    prob_all_fail = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_fail *= 1.0 - k / i
    return 1.0 - prob_all_fail


def lm_eval_pass_at_1(references: Sequence[str], predictions: Sequence, **limits) -> float:
    """lm-eval metric body for one document: run ``candidate + "\\n" + reference`` per candidate.

    lm-eval calls metrics with ``references=[gold]`` and ``predictions=[result]``, where
    ``result`` is a string or (after a filter returning lists) a list of candidate programs.
    The reference holds the tests. Returns the fraction of candidates that pass. Needs
    :data:`ALLOW_ENV_VAR` set to ``1``.
    """
    require_opt_in(opt_in_from_env())
    sources = []
    for ref, pred in zip(references, predictions, strict=True):
        for cand in [pred] if isinstance(pred, str) else pred:
            sources.append(f"{cand}\n{ref}\n")
    return pass_at_1(run_programs(sources, allow_code_execution=True, **limits))
