"""The import rules of ../shared/design/layout.md, read from the source with ``ast`` (top level and function
level).

Each rule has a checker (a function of the imports of a tree) and two tests: the real tree breaks none of
them, and a tiny synthetic tree in tmp_path that breaks it once is caught. How this tree realises the rules:

1. ``daemon/model/`` imports of the project: ``daemon.jittor_env``, ``daemon.weights.manifest``,
   ``daemon.model.*``.
2. ``daemon/pipeline.py`` and ``daemon/model/`` never import ``daemon.stages``, ``.supervisor``,
   ``.commands``, ``.wire`` or ``.viewer``.
3. ``daemon/stages/`` never imports ``daemon.supervisor`` or ``daemon.commands``.
4. ``daemon.pipeline`` is imported by ``daemon/stages/geometry.py`` (the live worker) and ``daemon/offline/``
   (the offline runner behind ``process`` and ``batch``; ``daemon/cluster/`` reaches it only through
   ``daemon.offline.worker``) and by nothing else under ``daemon/``. ``daemon.wire`` is imported by the
   publishers (``stages/publish_*``), ``commands/subscribe``, ``commands/demo`` (it subscribes to its own
   run), ``offline/outputs`` (the offline sinks write the publishers' png16 depth and Foxglove messages),
  ``stages/colour_stash`` (the publishers' JPEG colour store), ``viewer/`` and ``wire/`` itself.
5. Nothing under ``daemon/`` imports ``bench``, ``tests`` or ``reference``.
6. ``moge_sidecar`` imports of ``daemon``: public names of ``daemon.shm`` and ``daemon.logging_setup`` (the
   daemon's log line; standard library only). It never imports Jittor, ``daemon.jittor_env`` or
   ``daemon.model``.
7. ``daemon/viewer/`` never imports ``daemon.supervisor``.
8. A function-level import under ``daemon/`` and ``moge_sidecar/`` names a heavy or optional third-party
   package (:data:`HEAVY`) or a *heavy project module*: one that, at its top, imports such a package, calls
   ``import_jittor()`` or imports another heavy project module (so ``geometryd --help`` and the host-side
   numerics never load Jittor). Standard library, light third-party packages and other project modules are
   imported at the top. :data:`RULE8_EXCEPTIONS` lists the few deliberate exceptions, each with its reason.
9. Every ``# PATCH(pkg==ver): why`` tag names a version pinned in requirements*.txt, and says why.
"""

from __future__ import annotations

import ast
import functools
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT = ("daemon", "moge_sidecar", "bench", "tests", "reference")
SCANNED = ("daemon", "moge_sidecar")

# rule 8: packages that may be imported inside a function (import time, memory, or optional at run time)
HEAVY = ("jittor", "torch", "av", "aiortc", "aioice", "diffusers", "transformers", "ray", "cv2", "utils3d",
         "moge", "mcap", "foxglove", "aiomqtt", "huggingface_hub", "safetensors.torch", "gi",
         "setproctitle")  # setproctitle: a worker without it must still start (it only names the process)
RULE8_EXCEPTIONS: dict[tuple[str, str], str] = {
    ("daemon/jittor_env.py",
     "numpy"): "check_numpy reports a missing or broken numpy instead of failing to import",
}
SIDECAR_DAEMON_IMPORTS = ("daemon.shm", "daemon.logging_setup")
PIPELINE_IMPORTERS = ("daemon/stages/geometry.py", "daemon/offline/")
WIRE_IMPORTERS = ("daemon/stages/publish_", "daemon/stages/colour_stash.py", "daemon/commands/subscribe.py",
                  "daemon/commands/demo.py", "daemon/offline/outputs.py", "daemon/viewer/", "daemon/wire/")
PATCH_TAG = re.compile(r"#\s*PATCH\((?P<body>[^)]*)\)(?P<rest>.*)")


@dataclass(frozen=True)
class Import:
    file: str  # path relative to the tree's root
    line: int
    target: str  # absolute dotted module
    names: tuple[str, ...]  # the names of a ``from`` import, () for ``import x``
    in_function: bool
    type_only: bool = False  # under ``if TYPE_CHECKING:``: never executed, so it loads nothing

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _module_name(rel: str) -> str:
    parts = rel[:-3].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _tree_modules(root: Path) -> set[str]:
    paths = [p for top in PROJECT for p in (root / top).rglob("*.py")]
    return {_module_name(p.relative_to(root).as_posix()) for p in paths}


def read_imports(root: Path, tops: Iterable[str] = SCANNED) -> list[Import]:
    """Every import statement of every .py file under ``root/<top>``, resolved to absolute module names.

    ``from pkg import name`` targets ``pkg.name`` when that is a module of the tree, else ``pkg``.
    """
    modules = _tree_modules(root)
    found: list[Import] = []
    for top in tops:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            name = _module_name(rel)
            package = name if rel.endswith("__init__.py") else name.rpartition(".")[0]
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)

            def visit(node: ast.AST, in_function: bool, rel: str = rel, package: str = package,
                      type_only: bool = False) -> None:
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, ast.Import):
                        for alias in child.names:
                            found.append(Import(rel, child.lineno, alias.name, (), in_function, type_only))
                    elif isinstance(child, ast.ImportFrom):
                        base = child.module or ""
                        if child.level:
                            anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                            base = ".".join([*anchor, *([base] if base else [])])
                        names = tuple(a.name for a in child.names)
                        targets = dict.fromkeys(f"{base}.{n}" if f"{base}.{n}" in modules else base
                                                for n in names)
                        for target in targets:
                            found.append(Import(rel, child.lineno, target, names, in_function, type_only))
                    checking = isinstance(child, ast.If) and ast.unparse(child.test) in ("TYPE_CHECKING",
                                                                                      "typing.TYPE_CHECKING")
                    visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                   ast.Lambda)), type_only=type_only or checking)

            visit(tree, False)
    return found


def _is(target: str, *prefixes: str) -> bool:
    return any(target == p or target.startswith(p + ".") for p in prefixes)


def _project(target: str) -> bool:
    return _is(target, *PROJECT)


Violations = list[str]


# --- the checkers ------------------------------------------------------------------------------------------


def rule1_model_imports(imports: list[Import], root: Path) -> Violations:
    allowed = ("daemon.jittor_env", "daemon.weights.manifest", "daemon.model")
    return [f"{i.where()}: rule 1: daemon/model/ imports {i.target} (only {', '.join(allowed)})"
            for i in imports if i.file.startswith("daemon/model/") and _is(i.target, "daemon")
            and not _is(i.target, *allowed)]


def rule2_algorithm_is_offline(imports: list[Import], root: Path) -> Violations:
    banned = ("daemon.stages", "daemon.supervisor", "daemon.commands", "daemon.wire", "daemon.viewer")
    return [f"{i.where()}: rule 2: {i.file} imports {i.target} (the algorithm runs offline too)"
            for i in imports if (i.file == "daemon/pipeline.py" or i.file.startswith("daemon/model/"))
            and _is(i.target, *banned)]


def rule3_stages(imports: list[Import], root: Path) -> Violations:
    return [f"{i.where()}: rule 3: a stage imports {i.target}"
            for i in imports if i.file.startswith("daemon/stages/")
            and _is(i.target, "daemon.supervisor", "daemon.commands")]


def rule4_pipeline_and_wire(imports: list[Import], root: Path) -> Violations:
    out = []
    for i in imports:
        if not i.file.startswith("daemon/"):
            continue
        if _is(i.target, "daemon.pipeline") and not i.file.startswith(PIPELINE_IMPORTERS):
            out.append(f"{i.where()}: rule 4: only stages/geometry.py and offline/ import daemon.pipeline")
        if _is(i.target, "daemon.wire") and not i.file.startswith(WIRE_IMPORTERS):
            out.append(f"{i.where()}: rule 4: only publishers, colour_stash, commands/subscribe|demo, offline/outputs and "
                       "viewer/ import daemon.wire")
    return out


def rule5_no_bench_or_tests(imports: list[Import], root: Path) -> Violations:
    return [f"{i.where()}: rule 5: daemon/ imports {i.target}"
            for i in imports if i.file.startswith("daemon/") and _is(i.target, "bench", "tests", "reference")]


def rule6_sidecar(imports: list[Import], root: Path) -> Violations:
    out = []
    for i in imports:
        if not i.file.startswith("moge_sidecar/"):
            continue
        if _is(i.target, "jittor", "daemon.jittor_env", "daemon.model"):
            out.append(f"{i.where()}: rule 6: the PyTorch side imports {i.target} (Jittor code)")
        elif _is(i.target, "daemon") and not _is(i.target, *SIDECAR_DAEMON_IMPORTS):
            out.append(f"{i.where()}: rule 6: moge_sidecar imports {i.target} "
                       f"(only {SIDECAR_DAEMON_IMPORTS})")
        elif i.target == "daemon.shm" and any(n.startswith("_") for n in i.names):
            out.append(f"{i.where()}: rule 6: moge_sidecar imports private names {i.names} of daemon.shm")
    return out


def rule7_viewer(imports: list[Import], root: Path) -> Violations:
    return [f"{i.where()}: rule 7: the viewer imports {i.target}"
            for i in imports if i.file.startswith("daemon/viewer/") and _is(i.target, "daemon.supervisor")]


def _calls_import_jittor_at_top(path: Path) -> bool:
    def walk(node: ast.AST) -> bool:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.Call):
                f = child.func
                if (isinstance(f, ast.Name) and f.id == "import_jittor") or (
                        isinstance(f, ast.Attribute) and f.attr == "import_jittor"):
                    return True
            if walk(child):
                return True
        return False

    return walk(ast.parse(path.read_text(encoding="utf-8")))


def heavy_modules(imports: list[Import], root: Path) -> set[str]:
    """Project modules that load a heavy package when imported (directly or through another such module)."""
    paths = [p for top in SCANNED for p in (root / top).rglob("*.py")]
    files = {_module_name(p.relative_to(root).as_posix()): p for p in paths}
    heavy = {m for m, p in files.items() if _calls_import_jittor_at_top(p)}
    top = [i for i in imports if not i.in_function and not i.type_only]
    heavy |= {_module_name(i.file) for i in top if _is(i.target, *HEAVY)}
    while True:
        more = {_module_name(i.file) for i in top if i.target in heavy} - heavy
        if not more:
            return heavy
        heavy |= more


def rule8_imports_at_top(imports: list[Import], root: Path) -> Violations:
    heavy = heavy_modules(imports, root)
    out = []
    for i in imports:
        if not i.in_function or _is(i.target, *HEAVY) or (i.file, i.target.split(".")[0]) in RULE8_EXCEPTIONS:
            continue
        if _project(i.target):
            if i.target in heavy:
                continue
            out.append(f"{i.where()}: rule 8: function-level import of project module {i.target} (not heavy: "
                       "import it at the top)")
        elif i.target.split(".")[0] in sys.stdlib_module_names:
            out.append(f"{i.where()}: rule 8: function-level import of standard module {i.target}")
        else:
            out.append(f"{i.where()}: rule 8: function-level import of {i.target} (not in HEAVY: "
                       "import it at "
                       "the top, or add it to HEAVY with the reason)")
    return out


def _pins(root: Path) -> dict[str, str]:
    pins = {}
    for req in sorted(root.glob("requirements*.txt")):
        for line in req.read_text(encoding="utf-8").splitlines():
            m = re.match(r"^\s*([A-Za-z0-9_.-]+)==([^\s;#]+)", line)
            if m:
                pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def rule9_patch_tags(imports: list[Import], root: Path) -> Violations:
    pins = _pins(root)
    out = []
    for top in (*SCANNED, "bench"):
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                m = PATCH_TAG.search(line)
                if m is None:
                    continue
                pkg, sep, ver = m.group("body").partition("==")
                why = m.group("rest").lstrip()
                key = pkg.strip().lower().replace("_", "-")
                if not sep or not pkg.strip() or not ver.strip():
                    out.append(f"{rel}:{n}: rule 9: a PATCH tag must read PATCH(pkg==ver): {line.strip()}")
                elif not why.startswith(":") or not why[1:].strip():
                    out.append(f"{rel}:{n}: rule 9: PATCH({m.group('body')}) says no why (': reason')")
                elif key not in pins:
                    out.append(f"{rel}:{n}: rule 9: {pkg} is not pinned in requirements*.txt")
                elif pins[key] != ver.strip():
                    out.append(f"{rel}:{n}: rule 9: PATCH({pkg}=={ver}) but requirements pin "
                               f"{pkg}=={pins[key]}")
    return out


Checker = Callable[[list[Import], Path], Violations]


def check(checker: Checker, root: Path = REPO) -> Violations:
    return checker(_real_imports() if root == REPO else read_imports(root), root)


@functools.cache
def _real_imports() -> list[Import]:
    return read_imports(REPO)


# --- the real tree -----------------------------------------------------------------------------------------


def _assert_clean(checker: Checker) -> None:
    violations = check(checker)
    assert not violations, "\n".join(violations)


def test_rule1_model_imports_only_jittor_env_manifest_and_itself() -> None:
    _assert_clean(rule1_model_imports)


def test_rule2_pipeline_and_model_stay_offline() -> None:
    _assert_clean(rule2_algorithm_is_offline)


def test_rule3_stages_do_not_import_supervisor_or_commands() -> None:
    _assert_clean(rule3_stages)


def test_rule4_who_imports_pipeline_and_wire() -> None:
    _assert_clean(rule4_pipeline_and_wire)


def test_rule5_daemon_never_imports_bench_or_tests() -> None:
    _assert_clean(rule5_no_bench_or_tests)


def test_rule6_sidecar_imports_only_shm_and_logging_of_daemon() -> None:
    _assert_clean(rule6_sidecar)


def test_rule7_viewer_does_not_import_supervisor() -> None:
    _assert_clean(rule7_viewer)


def test_rule8_project_modules_are_imported_at_the_top() -> None:
    _assert_clean(rule8_imports_at_top)


def test_rule8_networks_are_the_heavy_modules() -> None:
    """The lazy imports rule 8 allows are the Jittor networks and the torch side; the CLI and host numerics
    are not among them (else `geometryd --help` would load Jittor)."""
    heavy = heavy_modules(_real_imports(), REPO)
    assert {"daemon.model.unet", "daemon.model.vae", "daemon.model.clip", "moge_sidecar.infer"} <= heavy
    light = {"daemon.cli", "daemon.pipeline", "daemon.model", "daemon.model.loader", "daemon.supervisor",
             "daemon.commands.doctor", "daemon.weights.tiny", "daemon.offline.process",
             "daemon.stages.geometry"}
    assert not heavy & light, heavy & light


def test_rule9_patch_tags_match_the_pins() -> None:
    paths = [p for top in SCANNED for p in (REPO / top).rglob("*.py")]
    tags = [p for p in paths if "PATCH(" in p.read_text(encoding="utf-8")]
    assert tags, "no PATCH(pkg==ver) tag found: the check below would be vacuous"
    _assert_clean(rule9_patch_tags)


# --- each checker catches a violation -----------------------------------------------------------------

# (checker, {file: source}) -> exactly the files named in the expected locations are flagged
SYNTHETIC: dict[str, tuple[Checker, dict[str, str], list[str]]] = {
    "rule1": (rule1_model_imports, {"daemon/model/net.py": "from daemon.config import Config\n"},
              ["daemon/model/net.py:1"]),
    "rule1-from-package": (rule1_model_imports, {"daemon/model/net.py": "from daemon import metrics\n"},
                           ["daemon/model/net.py:1"]),
    "rule2": (rule2_algorithm_is_offline,
              {"daemon/pipeline.py": "def f():\n    from daemon.wire import encoding\n"},
              ["daemon/pipeline.py:2"]),
    "rule3": (rule3_stages, {"daemon/stages/ingest.py": "import daemon.supervisor\n"},
              ["daemon/stages/ingest.py:1"]),
    "rule4-pipeline": (rule4_pipeline_and_wire, {"daemon/stages/runner.py": "from daemon import pipeline\n",
                                                 "daemon/pipeline.py": ""},
                       ["daemon/stages/runner.py:1"]),
    "rule4-wire": (rule4_pipeline_and_wire, {"daemon/supervisor.py": "from daemon.wire.encoding import x\n"},
                   ["daemon/supervisor.py:1"]),
    "rule5": (rule5_no_bench_or_tests,
              {"daemon/commands/bench.py": "def f():\n    from bench.suite import run\n"},
              ["daemon/commands/bench.py:2"]),
    "rule6-daemon": (rule6_sidecar, {"moge_sidecar/server.py": "from daemon.config import Config\n"},
                     ["moge_sidecar/server.py:1"]),
    "rule6-private": (rule6_sidecar, {"moge_sidecar/server.py": "from daemon.shm import _pid_alive\n"},
                      ["moge_sidecar/server.py:1"]),
    "rule6-jittor": (rule6_sidecar, {"moge_sidecar/infer.py": "def f():\n    import jittor\n"},
                     ["moge_sidecar/infer.py:2"]),
    "rule7": (rule7_viewer, {"daemon/viewer/hub.py": "from daemon.supervisor import Daemon\n"},
              ["daemon/viewer/hub.py:1"]),
    "rule8-project": (rule8_imports_at_top, {"daemon/a.py": "def f():\n    from daemon.b import g\n",
                                             "daemon/b.py": "import json\n"}, ["daemon/a.py:2"]),
    "rule8-stdlib": (rule8_imports_at_top,
                     {"daemon/a.py": "class A:\n    def f(self):\n        import json\n"},
                     ["daemon/a.py:3"]),
    "rule8-light": (rule8_imports_at_top, {"moge_sidecar/a.py": "async def f():\n    import msgspec\n"},
                    ["moge_sidecar/a.py:2"]),
    "rule9-version": (rule9_patch_tags, {"daemon/a.py": "x = 1  # PATCH(aiohttp==3.0.0): private field\n",
                                         "requirements.txt": "aiohttp==3.14.5\n"}, ["daemon/a.py:1"]),
    "rule9-unpinned": (rule9_patch_tags, {"daemon/a.py": "# PATCH(nothere==1.0): why\n",
                                          "requirements.txt": "aiohttp==3.14.5\n"}, ["daemon/a.py:1"]),
    "rule9-no-why": (rule9_patch_tags, {"daemon/a.py": "# PATCH(aiohttp==3.14.5)\n",
                                        "requirements.txt": "aiohttp==3.14.5\n"}, ["daemon/a.py:1"]),
}

# allowed shapes next to each violation: the checker must not flag these
SYNTHETIC_CLEAN: dict[str, tuple[Checker, dict[str, str]]] = {
    "rule1": (rule1_model_imports, {"daemon/model/net.py": "from daemon.jittor_env import import_jittor\n"
                                                           "from daemon.weights.manifest import m\n"
                                                           "from daemon.model import blocks\n"}),
    "rule4": (rule4_pipeline_and_wire, {"daemon/stages/geometry.py": "from daemon.pipeline import G\n",
                                        "daemon/offline/worker.py": "from daemon import pipeline\n",
                                        "daemon/stages/publish_mqtt.py":
                                            "from daemon.wire import encoding\n"}),
    "rule6": (rule6_sidecar, {"moge_sidecar/server.py": "from daemon.shm import FrameRing\n"
                                                        "from daemon.logging_setup import setup_logging\n"}),
    "rule8": (rule8_imports_at_top,
              {"daemon/a.py": "def f():\n    import torch\n    from daemon.net import N\n",
                                     "daemon/net.py": "from daemon.jittor_env import import_jittor\n"
                                                      "jt = import_jittor()\n",
                                     "daemon/jittor_env.py": "def check():\n    import numpy\n"}),
    "rule9": (rule9_patch_tags, {"daemon/a.py": "# PATCH(aiohttp==3.14.5): private field\n",
                                 "requirements.txt": "aiohttp==3.14.5\n"}),
}


def _write_tree(root: Path, files: dict[str, str]) -> None:
    for top in (*SCANNED, "bench"):
        (root / top).mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")


@pytest.mark.parametrize("case", list(SYNTHETIC))
def test_each_rule_catches_its_violation(case: str, tmp_path: Path) -> None:
    checker, files, expected = SYNTHETIC[case]
    _write_tree(tmp_path, files)
    violations = check(checker, tmp_path)
    assert [v.split(": ")[0] for v in violations] == expected, violations
    rule = case.split("-")[0].removeprefix("rule")
    assert all(f"rule {rule}:" in v for v in violations), violations


@pytest.mark.parametrize("case", list(SYNTHETIC_CLEAN))
def test_each_rule_accepts_the_allowed_shape(case: str, tmp_path: Path) -> None:
    checker, files = SYNTHETIC_CLEAN[case]
    _write_tree(tmp_path, files)
    assert check(checker, tmp_path) == []
