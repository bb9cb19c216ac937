"""``launch/local.sh`` (issue 26 §10): its exit status is the processes' (the first failure's, or 75
when they were preempted), a failure stops the others (SIGKILL after ``ESMJAX_KILL_GRACE`` for one
that ignores SIGTERM, as one blocked in a collective does), and SIGTERM/SIGINT to the script reach
every process as SIGTERM. Plain ``python -c`` processes: no JAX, a few seconds in all."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SH = ROOT / "launch" / "local.sh"
PY = sys.executable

# Each process's id and the variables local.sh sets for it, one line.
SHOW = (
    "import os; e = os.environ; print('id', e['ESMJAX_PROCESS_ID'], 'of', "
    "e['ESMJAX_NUM_PROCESSES'], 'devices', e['JAX_NUM_CPU_DEVICES'], e['ESMJAX_COORDINATOR'])"
)


# Execs its arguments with SIGINT as a terminal leaves it: a test run started in the background of
# a script ignores SIGINT, and bash cannot trap a signal that was ignored when it started.
DEFAULT_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def start(nproc: int, code: str, tmp_path: Path, **env: str) -> subprocess.Popen:
    """``local.sh NPROC 2 python -c CODE`` in its own session (so that a test can clean up all of
    it), ``tmp_path`` as the working folder."""
    return subprocess.Popen(
        [PY, "-c", DEFAULT_SIGINT, str(LOCAL_SH), str(nproc), "2", PY, "-c", code],
        cwd=tmp_path,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, float]:
    """(status, output, seconds) of a started local.sh; fails the test (and kills everything it
    started) if it runs past ``timeout``."""
    t0 = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"launch/local.sh still running after {timeout} s; output:\n{out[-3000:]}")
    return proc.returncode, out, time.monotonic() - t0


def run(nproc: int, code: str, tmp_path: Path, timeout: float = 30, **env: str):
    return finish(start(nproc, code, tmp_path, **env), timeout)


def test_all_succeed_with_prefixed_output(tmp_path):
    rc, out, _ = run(3, SHOW, tmp_path)
    assert rc == 0, out
    for i in range(3):
        assert f"[p{i}] id {i} of 3 devices 2 127.0.0.1:" in out, out


def test_usage(tmp_path):
    proc = subprocess.run([str(LOCAL_SH), "2"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS COMMAND" in proc.stderr


@pytest.mark.parametrize(
    "code,expected",
    [
        # one process fails, the other succeeds
        ("import os, sys; sys.exit(3 if os.environ['ESMJAX_PROCESS_ID'] == '1' else 0)", 3),
        # every process fails the same way
        ("import sys; sys.exit(3)", 3),
        ("raise ValueError('bad input')", 1),
    ],
)
def test_status_of_a_failure(tmp_path, code, expected):
    rc, out, _ = run(2, code, tmp_path)
    assert rc == expected, out
    if "raise" in code:  # the first to fail is reported; it may stop the other before it prints
        assert re.search(r"^\[p[01]\] ValueError: bad input$", out, re.M), out


@pytest.mark.parametrize(
    "statuses,expected",
    [
        ((75, 75), 75),  # preempted, both with their checkpoint: run again to resume
        ((75, 0), 75),
        ((0, 75), 75),
        ((75, 2), 2),  # a failure wins over a preemption
    ],
)
def test_preempted_status(tmp_path, statuses, expected):
    code = f"import os, sys; sys.exit({list(statuses)}[int(os.environ['ESMJAX_PROCESS_ID'])])"
    rc, out, _ = run(2, code, tmp_path)
    assert rc == expected, out


# Process 1 fails once process 0 is up; process 0 writes its pid, then waits forever (as one blocked
# in a collective with the failed process would). IGNORE: it ignores SIGTERM too.
BLOCKED = """
import os, signal, sys, time
if IGNORE:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if os.environ['ESMJAX_PROCESS_ID'] == '0':
    open('p0.pid', 'w').write(str(os.getpid()))
    time.sleep(1e9)
while not os.path.exists('p0.pid'):
    time.sleep(0.05)
sys.exit(4)
"""


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("ignore_term", [False, True], ids=["stopped", "killed"])
def test_a_failure_stops_a_blocked_process(tmp_path, ignore_term):
    """Exits with the failure's status within seconds; the blocked process is gone: stopped by
    SIGTERM or, ignoring it, by SIGKILL after the grace period."""
    code = BLOCKED.replace("IGNORE", str(ignore_term))
    rc, out, took = run(2, code, tmp_path, timeout=20, ESMJAX_KILL_GRACE="1")
    assert rc == 4, out
    assert took < 10, (took, out)
    assert "process 1 exited with status 4; stopping the others" in out, out
    pid = int((tmp_path / "p0.pid").read_text())
    deadline = time.monotonic() + 5
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(pid), f"process 0 (pid {pid}) still running"


# Each process: a SIGTERM handler that writes which signal came, prints and exits 75 (as esmjax
# does once its checkpoint is saved); "ready" once it is installed.
PREEMPTIBLE = """
import os, signal, sys, time
i = os.environ['ESMJAX_PROCESS_ID']
def stop(signum, frame):
    open(f'stopped{i}', 'w').write(signal.Signals(signum).name)
    print('saved', flush=True)
    sys.exit(75)
signal.signal(signal.SIGTERM, stop)
open(f'ready{i}', 'w').close()
time.sleep(1e9)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_reaches_every_process(tmp_path, sig):
    proc = start(2, PREEMPTIBLE, tmp_path)
    deadline = time.monotonic() + 20
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        if time.monotonic() > deadline or proc.poll() is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"the processes did not start: {proc.communicate()[0][-3000:]}")
        time.sleep(0.05)
    proc.send_signal(sig)
    rc, out, _ = finish(proc, 20)
    assert rc == 75, out
    for i in range(2):
        assert (tmp_path / f"stopped{i}").read_text() == "SIGTERM"
        assert f"[p{i}] saved" in out, out
