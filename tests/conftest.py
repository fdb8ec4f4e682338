"""Shared test setup: offline hubs, the import roots, and the suite's time per top-level test folder.

tests/ and the repository root go on sys.path, so a test imports ``helpers.x`` (tests/helpers/), ``reference.x``
(the torch oracles) and the project's packages, whichever folder it sits in. Test files keep unique basenames
(pytest imports them by basename: the folders have no ``__init__.py``).
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
for _root in (str(REPO), str(TESTS)):
    if _root not in sys.path:
        sys.path.insert(0, _root)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_folder_seconds: dict[str, float] = defaultdict(float)


def _folder_of(nodeid: str) -> str:
    """The top-level folder under tests/ of a test id (``tests/model/test_x.py::t`` -> ``model``)."""
    parts = Path(nodeid.split("::", 1)[0]).parts
    if "tests" in parts:
        parts = parts[parts.index("tests") + 1:]
    return parts[0] if len(parts) > 1 else "."


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # setup + call + teardown of every test, also of failed and skipped ones (a skip costs its setup)
    _folder_seconds[_folder_of(report.nodeid)] += report.duration


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _folder_seconds:
        return
    parts = ", ".join(f"{name} {secs:.0f} s" for name, secs in sorted(_folder_seconds.items(),
                                                                      key=lambda kv: -kv[1]))
    terminalreporter.write_line(f"suite time per folder: {parts}")
