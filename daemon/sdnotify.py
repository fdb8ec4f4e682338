"""systemd notify protocol (sd_notify(3)): one datagram to ``$NOTIFY_SOCKET``; a no-op when it is unset.

An address starting with ``@`` is a Linux abstract socket (leading NUL byte). Errors are swallowed:
a daemon must never die because its supervisor's socket went away.
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send e.g. ``"READY=1"``, ``"WATCHDOG=1"``, ``"STOPPING=1"``; returns whether a datagram was sent."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), addr)
        return True
    except OSError:
        return False


def watchdog_interval_s() -> float | None:
    """Half of ``$WATCHDOG_USEC`` (systemd's advice) when the watchdog is enabled for this pid, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6
