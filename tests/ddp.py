"""Running two-process CPU DDP in tests, robustly on a loaded machine.

A process group over gloo can fail to start for reasons that say nothing about the code under test:
another test run grabbed the port Lightning picked, a rendezvous timed out while the machine was
swamped, a worker was killed (SIGABRT) while connecting. Those failures are retried in a fresh
folder; an assertion or an ordinary error of the code under test is never retried.
"""

import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("tests.ddp")

ATTEMPTS = 3
TIMEOUT_S = 600  # a two-process run of the tiny presets takes ~10 s idle; a swamped 2-core machine, minutes
# Text of start-up failures of a gloo process group (or of a worker lost while connecting).
INFRASTRUCTURE = ("gloo", "Connection reset", "Connection refused", "Address already in use", "timed out",
                  "Timeout", "rendezvous", "ProcessExitedException", "process 0 terminated", "process 1 terminated",
                  "SIGABRT", "signal 6", "Broken pipe")


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_infrastructure_failure(text: str, returncode: int | None = None) -> bool:
    """Whether a failed DDP run died of the process group rather than of the code under test."""
    if returncode is not None and returncode < 0 and -returncode in (signal.SIGABRT, signal.SIGKILL, signal.SIGSEGV):
        return True
    return any(marker in text for marker in INFRASTRUCTURE) and "AssertionError" not in text


def run_cli_subprocess(args: list[str], cwd: Path, repo: Path, timeout: int = TIMEOUT_S,
                       attempts: int = ATTEMPTS) -> subprocess.CompletedProcess:
    """`python run.py *args` in a fresh process, on a fresh port, retried when the process group fails.

    DDP starts its second process by rerunning the same command, so DDP runs of the CLI go through here.
    A retry reruns the same command in the same folder: the CLI's stages resume or overwrite their outputs.
    """
    result = None
    for attempt in range(1, attempts + 1):
        env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
        result = subprocess.run([sys.executable, str(repo / "run.py"), *map(str, args)], cwd=cwd, env=env,
                                capture_output=True, text=True, timeout=timeout)
        if result.returncode == 0 or not is_infrastructure_failure(result.stderr, result.returncode):
            break
        log.warning("DDP run failed to start (attempt %d of %d, exit %d); retrying", attempt, attempts,
                    result.returncode)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def with_retries(run: Callable[[Path], None], root: Path, attempts: int = ATTEMPTS) -> Path:
    """Call `run(folder)` in a fresh folder under `root` until the process group starts; returns the folder.

    For in-process spawning (`strategy="ddp_spawn"`, `torch.multiprocessing.spawn`): a start-up failure
    reaches the caller as an exception naming the dead worker or the gloo error.
    """
    for attempt in range(1, attempts + 1):
        folder = root / f"attempt{attempt}"
        folder.mkdir(parents=True)
        os.environ["MASTER_PORT"] = str(free_port())
        try:
            run(folder)
            return folder
        except AssertionError:
            raise
        except Exception as err:  # noqa: BLE001 - classified below, re-raised unless it is the process group
            if attempt == attempts or not is_infrastructure_failure(f"{type(err).__name__}: {err}"):
                raise
            log.warning("DDP run failed to start (attempt %d of %d: %s); retrying", attempt, attempts, err)
        finally:
            os.environ.pop("MASTER_PORT", None)
    raise AssertionError("unreachable")
