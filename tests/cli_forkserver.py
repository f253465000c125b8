"""The real `minpro` CLI without paying interpreter and torch start-up per command: a server
process imports the CLI once, then forks a child per request that runs it in its own working
directory with stdout/stderr to files (tests/test_faults.py runs some sixty commands).

Run as a script it serves JSON requests on stdin, one per line, and answers each with its
child's exit code; `ForkServer` is the test side."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path


class ForkServer:
    """One server process; `run` has the shape of subprocess.run(capture_output=True, text=True)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, text=True)  # fmt: skip
        self.outputs = Path(tempfile.mkdtemp(prefix="minpro-forkserver-"))

    def run(self, cwd: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        out, err = self.outputs / "stdout", self.outputs / "stderr"
        request = {"cwd": str(cwd), "args": args, "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"the fork server died (exit {self.proc.wait()})")
        code = json.loads(answer)["returncode"]
        return subprocess.CompletedProcess(["minpro", *args], code, out.read_text(), err.read_text())

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)
        shutil.rmtree(self.outputs, ignore_errors=True)


def child(request: dict) -> int:
    """Run one command as `python -m minpro_cli` would: its exit code."""
    from minpro_cli.cli import main

    os.chdir(request["cwd"])
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):  # fmt: skip
        os.dup2(os.open(path, flags, 0o644), fd)
    sys.argv = ["minpro", *request["args"]]
    try:
        main()
        return 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001 — what the interpreter would print
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def serve() -> None:
    import minpro_cli.cli  # noqa: F401 — imported once, before any fork

    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            os._exit(child(json.loads(line)))
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve()
