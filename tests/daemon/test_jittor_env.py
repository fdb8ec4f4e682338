"""daemon.jittor_env: Jittor's process-wide signal handlers must not kill a supervising daemon."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(
    """
    import os, signal, subprocess, sys, threading, time
    from daemon.jittor_env import import_jittor
    if sys.argv[1] == "thread":  # what `geometryd demo` did: asyncio.to_thread(make_tiny) imported Jittor
        box = []
        def first_use():
            box.append(import_jittor())
            import jittor_utils
            jittor_utils.run_cmds([], "", "")  # what a kernel compile does first: make the compile pool
        t = threading.Thread(target=first_use)
        t.start(); t.join()  # the thread's exit SIGKILLs pool workers it forked (PR_SET_PDEATHSIG)
        time.sleep(0.5)
        jt = box[0]
    else:
        jt = import_jittor()
    assert (jt.array([1.0, 2.0]) * 3).numpy().tolist() == [3.0, 6.0]
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    time.sleep(0.2)
    child.send_signal(signal.SIGKILL)   # Jittor's own handler would quick-exit this process here
    child.wait()
    time.sleep(0.3)
    print("SURVIVED child SIGKILL", child.returncode, flush=True)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    time.sleep(0.2)
    child.send_signal(signal.SIGSTOP)   # CLD_STOPPED: Jittor's handler quick-exits on this too
    time.sleep(0.3)
    child.kill(); child.wait()
    print("SURVIVED child SIGSTOP", flush=True)
    try:
        os.kill(os.getpid(), signal.SIGINT)  # Jittor's handler: "Caught SIGINT, quick exit"
        time.sleep(1)
        print("NO KeyboardInterrupt", flush=True)
    except KeyboardInterrupt:
        print("KeyboardInterrupt raised", flush=True)
    """
)


@pytest.mark.parametrize("where", ["main", "thread"])
def test_child_killed_by_signal_does_not_kill_a_jittor_process(where: str) -> None:
    out = subprocess.run([sys.executable, "-c", CHILD, where], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "SURVIVED child SIGKILL -9" in out.stdout
    assert "SURVIVED child SIGSTOP" in out.stdout
    assert "KeyboardInterrupt raised" in out.stdout
    assert "quick exit" not in out.stderr


def test_import_jittor_probes_the_driver_once() -> None:
    """The model code calls import_jittor() for every op it builds (4152 calls in one anchor run): after the
    first call it must not probe the CUDA driver again (dlopen + cuInit + PATH search per call cost seconds)."""
    code = textwrap.dedent(
        """
        from daemon import jittor_env
        jt = jittor_env.import_jittor()
        def probe():
            raise AssertionError("detect_cuda called again")
        jittor_env.detect_cuda = probe
        assert jittor_env.import_jittor() is jt
        print("once")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "once" in out.stdout, out.stderr[-2000:]
