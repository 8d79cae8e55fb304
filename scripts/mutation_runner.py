"""A fork server that makes each mutmut test run cost the tests, not the imports.

mutmut 2 runs its test command once per mutant; importing torch alone takes 2-10 s on a
shared machine, more than the fast tests themselves. ``serve`` imports the heavy
dependencies once (never freeformer: each run must import the mutated source afresh) and
forks a child per request that runs pytest; ``run`` is the command given to mutmut: it
sends its arguments and exits with pytest's status. If mutmut gives up on a run (its
timeout kills ``run``), the server kills that child too.

    python scripts/mutation_runner.py serve SOCKET LOG &
    python scripts/mutation_runner.py run SOCKET -- -x -q tests/test_generate.py
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys


def serve(path: str, log: str) -> None:
    import numpy  # noqa: F401  heavy dependencies, imported once
    import pytest  # noqa: F401
    import torch  # noqa: F401

    try:
        import hypothesis  # noqa: F401
        import safetensors.torch  # noqa: F401
    except ImportError:
        pass
    assert not any(m.startswith("freeformer") for m in sys.modules)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(path):
        os.unlink(path)
    srv.bind(path)
    srv.listen(1)
    while True:
        conn, _ = srv.accept()
        with conn:
            req = json.loads(conn.makefile().readline())
            pid = os.fork()
            if pid == 0:  # child: a fresh import of the (mutated) source, then pytest
                srv.close()
                conn.close()
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.chdir(req["cwd"])
                sys.path[:0] = req["path"]
                sys.dont_write_bytecode = True
                import pytest

                os._exit(int(pytest.main(req["args"])))
            status = None
            while status is None:
                done, st = os.waitpid(pid, os.WNOHANG)
                if done:
                    status = os.waitstatus_to_exitcode(st)
                    break
                r, _, _ = select.select([conn], [], [], 0.05)
                if r and not conn.recv(1):  # the client was killed: stop its tests
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    status = -1
            try:
                conn.sendall(f"{status}\n".encode())
            except OSError:
                pass


def run(path: str, args: list[str]) -> int:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    src = os.environ.get("PYTHONPATH", "")
    s.sendall(
        (
            json.dumps(
                {"cwd": os.getcwd(), "args": args, "path": [p for p in src.split(os.pathsep) if p]}
            )
            + "\n"
        ).encode()
    )
    reply = s.makefile().readline().strip()
    code = int(reply) if reply else 1
    return 0 if code == 0 else 1  # any failure (tests, collection, crash) kills the mutant


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "run":
        sys.exit(run(sys.argv[2], sys.argv[sys.argv.index("--") + 1 :]))
    else:
        sys.exit("usage: mutation_runner.py serve SOCKET LOG | run SOCKET -- PYTEST_ARGS")
