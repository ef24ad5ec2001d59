"""Subprocess of test_cli_errors: `main.py ARGS` for many argument lists, each run in a child
forked from this one process once the package's modules are imported.

A fresh interpreter with JAX, Flax and the package's imports costs ~5 s of a 2-core CPU per
case, the case itself well under one; test_cli_errors times one fresh interpreter on its own.
No JAX backend is started here before a fork (each child starts its own).

`python -m tests.forked_cli CASES.json RESULTS.json`: CASES maps a name to its argument list
after `main.py`; RESULTS gets name -> [exit status, output (stderr and stdout together),
seconds]. A child still running after CHILD_TIMEOUT seconds is killed by its alarm.
"""

import json
import os
import signal
import sys
import tempfile
import time
import traceback

from ddpm import cli, editing, evaluate, generate, pretrained, sweep, train  # noqa: F401

CHILD_TIMEOUT = 120


def run_case(args: list[str], log_path: str) -> int:
    """Exit status of `main.py ARGS` run by `ddpm.cli.run()` in a forked child whose stdout
    and stderr go to `log_path`."""
    pid = os.fork()
    if pid == 0:
        signal.alarm(CHILD_TIMEOUT)
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        sys.argv = ["main.py", *args]
        code = 1
        try:
            cli.run()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:  # noqa: BLE001 - report a bug's traceback as main.py would
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def main(cases_path: str, results_path: str) -> None:
    with open(cases_path) as f:
        cases = json.load(f)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in cases.items():
            log_path = os.path.join(tmp, f"{name}.log")
            start = time.perf_counter()
            status = run_case(args, log_path)
            seconds = time.perf_counter() - start
            with open(log_path) as f:
                results[name] = [status, f.read(), seconds]
    with open(results_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
