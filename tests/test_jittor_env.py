"""daemon.jittor_env: Jittor's process-wide signal handlers must not kill a supervising daemon."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    from daemon.jittor_env import import_jittor
    jt = import_jittor()
    assert (jt.array([1.0, 2.0]) * 3).numpy().tolist() == [3.0, 6.0]
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    time.sleep(0.2)
    child.send_signal(signal.SIGKILL)   # Jittor's own handler would quick-exit this process here
    child.wait()
    time.sleep(0.3)
    print("SURVIVED child SIGKILL", child.returncode, flush=True)
    try:
        os.kill(os.getpid(), signal.SIGINT)  # Jittor's handler: "Caught SIGINT, quick exit"
        time.sleep(1)
        print("NO KeyboardInterrupt", flush=True)
    except KeyboardInterrupt:
        print("KeyboardInterrupt raised", flush=True)
    """
)


def test_child_killed_by_signal_does_not_kill_a_jittor_process() -> None:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "SURVIVED child SIGKILL -9" in out.stdout
    assert "KeyboardInterrupt raised" in out.stdout
    assert "quick exit" not in out.stderr
