"""The import rules between the sandbox's layers, checked on the source.

Every module under ``sandbox/`` is parsed with :mod:`ast` (never imported),
and every import in it -- at module level, under ``if TYPE_CHECKING:``, or
inside a function -- is resolved to an absolute module name.  The layers,
bottom to top::

    arch  <  memory  <  svm  <  sev  <  hypervisor, fuzz, experiments  <  debug  <  cli

A rule that is broken fails its test with each offending line named as
``file:line: importer -> imported``.  The checker is plain functions over a
directory, so :func:`test_checker_reports_each_rule` can feed it a small
synthetic tree with one violation of each rule and see every one reported.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "sandbox"

#: Imports allowed inside a function: (importing module, imported module or
#: package) -> why.  Only a heavy dependency that most runs never need may be
#: deferred; anything else is imported at the top of its module.
FUNCTION_IMPORTS_ALLOWED: dict[tuple[str, str], str] = {
    ("sandbox.fuzz.differential", "keystone"):
        "the assembler (~90 ms to import) is needed only to build the differential's QEMU stub",
    ("sandbox.cli.run", "sandbox.cli.sev"):
        "the SEV stack imports cryptography and numpy (~0.5 s), which runs without --sev never need",
    ("sandbox.experiments.plotting", "matplotlib"):
        "matplotlib (0.5-3 s to import) is needed only to draw an experiment's plot, never by "
        "'sandbox run', which imports the experiment registry for its subcommand",
    ("sandbox.fuzz.cluster", "ray"):
        "Ray is an optional extra (import ~1 s), needed only by 'sandbox fuzz --ray'",
    ("sandbox.fuzz.arcs", "coverage"):
        "coverage.py is an optional extra, needed only to write --coverage-report's HTML at a campaign's end",
    ("sandbox.cli", "sandbox.cli.run"):
        "the command's modules (about a second to import) load inside main(), so a Ctrl-C while they "
        "do is one line and exit status 130 rather than a traceback",
}

#: Private attributes of objects the project does not own that a module may
#: touch: (module, attribute) -> why.  An entry is for a third-party or
#: standard-library internal with no public equivalent, never for another
#: project module's private name.
PRIVATE_ALLOWED: dict[tuple[str, str], str] = {
    ("sandbox.svm.cpustate", "_uch"):
        "Unicorn's engine handle (Uc._uch): uc_context_save/restore and uc_reg_read/write "
        "are called on it directly, emu_counter/invalid_addr are read from its struct, and its "
        "cpu pointer leads to the CPU state, read and written in place",
    ("sandbox.svm.engine", "_uch"):
        "Unicorn's engine handle (Uc._uch): the processor adds and deletes its raw hooks with "
        "uclib.uc_hook_add / uc_hook_del in this one module",
    ("sandbox.hypervisor.loader", "_exit"):
        "os._exit: the documented way for a forked child to leave without running the "
        "parent's cleanup",
}


# -- the checker -------------------------------------------------------------------
@dataclass(frozen=True)
class Import:
    file: str            # path relative to the scanned root, with '/'
    line: int
    importer: str        # absolute module name of the importing module
    imported: str        # absolute module name imported
    names: tuple[str, ...]   # names taken by ``from ... import`` ('' for ``import x``)
    in_function: bool

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.importer} -> {self.imported}"


@dataclass(frozen=True)
class Private:
    file: str
    line: int
    module: str
    expr: str            # the offending expression, e.g. 'cpu._ivec'
    attr: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.module} uses {self.expr}"


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Every module and package under ``root/package``: name -> file."""
    return {module_name(root, p): p for p in sorted((root / package).rglob("*.py"))}


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    if node.level > 1:
        base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _in_function(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return True
    return False


def imports(root: Path, package: str = PACKAGE) -> list[Import]:
    """Every import statement in the package, resolved to absolute module names.

    ``from pkg import name`` counts as importing ``pkg.name`` when that is a
    module of the tree (``from .. import cli``), else as importing ``pkg``.
    """
    mods = modules(root, package)
    out = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        parents = _parents(tree)
        rel = path.relative_to(root).as_posix()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    out.append(Import(rel, node.lineno, mod, alias.name, ("",),
                                      _in_function(node, parents)))
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, path.name == "__init__.py", node)
                targets: dict[str, list[str]] = {}
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.setdefault(sub if sub in mods else base, []).append(alias.name)
                for target, names in targets.items():
                    out.append(Import(rel, node.lineno, mod, target, tuple(names),
                                      _in_function(node, parents)))
    return sorted(out, key=lambda i: (i.file, i.line, i.imported))


def within(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _layer(rule: str, importers: tuple[str, ...], forbidden: tuple[str, ...], *,
           outside: bool = False):
    def check(imps: list[Import]) -> list[Import]:
        return [i for i in imps
                if within(i.importer, *importers) != outside and within(i.imported, *forbidden)]
    check.rule = rule
    return check


P = PACKAGE
LAYER_RULES = {
    "svm-memory-below-the-rest": _layer(
        "sandbox/svm/ and sandbox/memory/ import neither hypervisor, cli, fuzz nor sev",
        (f"{P}.svm", f"{P}.memory"), (f"{P}.hypervisor", f"{P}.cli", f"{P}.fuzz", f"{P}.sev")),
    "memory-below-svm": _layer(
        "sandbox/memory/ does not import sandbox.svm",
        (f"{P}.memory",), (f"{P}.svm",)),
    "sev-below-hypervisor": _layer(
        "sandbox/sev/ imports neither sandbox.hypervisor nor sandbox.cli",
        (f"{P}.sev",), (f"{P}.hypervisor", f"{P}.cli")),
    "cli-on-top": _layer(
        "only sandbox/cli/ imports sandbox.cli",
        (f"{P}.cli",), (f"{P}.cli",), outside=True),
    "arch-at-the-bottom": _layer(
        "sandbox/arch.py imports nothing from the project",
        (f"{P}.arch",), (P,)),
    "debug-above-the-machine": _layer(
        "sandbox/debug/ (gdb stub, timeline, recordings) plugs in from above: no layer below cli imports it",
        (f"{P}.arch", f"{P}.memory", f"{P}.svm", f"{P}.sev", f"{P}.hypervisor", f"{P}.fuzz",
         f"{P}.experiments"), (f"{P}.debug",)),
}


def function_import_violations(imps: list[Import],
                               allowed=FUNCTION_IMPORTS_ALLOWED) -> list[Import]:
    return [i for i in imps if i.in_function
            and not any(i.importer == m and within(i.imported, dep) for m, dep in allowed)]


def _is_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def _private(name: str) -> bool:
    return name.startswith("_") and not _is_dunder(name)


def _own(receiver: ast.expr) -> bool:
    """``self``, ``cls`` or ``super()``: the object's own private names."""
    if isinstance(receiver, ast.Name):
        return receiver.id in ("self", "cls")
    return (isinstance(receiver, ast.Call) and isinstance(receiver.func, ast.Name)
            and receiver.func.id == "super")


def private_uses(root: Path, package: str = PACKAGE) -> list[Private]:
    """Every ``x._name`` whose ``x`` is not self/cls/super(), and every
    ``from module import _name`` (another module's private name)."""
    out = []
    for mod, path in modules(root, package).items():
        tree = ast.parse(path.read_text(), str(path))
        rel = path.relative_to(root).as_posix()
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr) and not _own(node.value):
                out.append(Private(rel, node.lineno, mod, ast.unparse(node), node.attr))
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if _private(alias.name):
                        src = "." * node.level + (node.module or "")
                        out.append(Private(rel, node.lineno, mod,
                                           f"from {src} import {alias.name}", alias.name))
    return sorted(out, key=lambda p: (p.file, p.line, p.expr))


def private_violations(uses: list[Private], allowed=PRIVATE_ALLOWED) -> list[Private]:
    return [u for u in uses if (u.module, u.attr) not in allowed]


def _report(rule: str, found: list) -> str:
    return f"{rule}: {len(found)} violation(s)\n" + "\n".join(f"  {v}" for v in found)


# -- the rules on the real tree ---------------------------------------------------------
@pytest.fixture(scope="module")
def project_imports() -> list[Import]:
    return imports(ROOT)


@pytest.fixture(scope="module")
def project_private_uses() -> list[Private]:
    return private_uses(ROOT)


def test_the_scan_sees_the_project(project_imports):
    """Guard against a checker that passes because it read nothing."""
    mods = modules(ROOT)
    assert {f"{P}.arch", f"{P}.svm.cpu", f"{P}.memory.mmu", f"{P}.sev.rmp",
            f"{P}.hypervisor.machine", f"{P}.cli.run"} <= set(mods)
    assert any(i.importer == f"{P}.svm.cpu" and i.imported == f"{P}.svm.cpustate"
               for i in project_imports)


@pytest.mark.parametrize("rule", list(LAYER_RULES))
def test_layer_rule(rule, project_imports):
    check = LAYER_RULES[rule]
    found = check(project_imports)
    assert not found, _report(check.rule, found)


def test_imports_at_module_level(project_imports):
    """Imports go at the top of the module: one inside a function hides a
    dependency (and often a layering cycle) until the function runs."""
    found = function_import_violations(project_imports)
    assert not found, _report("import inside a function (not in FUNCTION_IMPORTS_ALLOWED)", found)


def test_no_private_names_of_other_objects(project_private_uses):
    found = private_violations(project_private_uses)
    assert not found, _report("use of another object's or module's private name "
                              "(not in PRIVATE_ALLOWED)", found)


def test_allow_lists_are_current(project_imports, project_private_uses):
    """Every allow-list entry still matches some code; a stale one is removed."""
    stale = [f"FUNCTION_IMPORTS_ALLOWED{key}" for key in FUNCTION_IMPORTS_ALLOWED
             if not any(i.in_function and i.importer == key[0] and within(i.imported, key[1])
                        for i in project_imports)]
    stale += [f"PRIVATE_ALLOWED{key}" for key in PRIVATE_ALLOWED
              if not any((u.module, u.attr) == key for u in project_private_uses)]
    assert not stale, "allow-list entries that match nothing:\n" + "\n".join(stale)


# -- the checker can fail -----------------------------------------------------------------
SYNTHETIC = {
    "sandbox/__init__.py": "",
    "sandbox/arch.py": "from .svm import cpu\n",                            # arch imports project
    "sandbox/memory/__init__.py": "",
    "sandbox/memory/mmu.py": (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from ..svm.cpu import Cpu\n"                                   # memory -> svm
        "import sandbox.fuzz.case\n"),                                     # memory -> fuzz
    "sandbox/svm/__init__.py": "",
    "sandbox/svm/cpu.py": (
        "def f():\n"
        "    from ..hypervisor import machine\n"                            # svm -> hypervisor,
        "    return machine\n"                                              # inside a function
        "def g(uc, other):\n"
        "    return uc._uch, other._ivec, self_._x, super().__init__\n"),   # 3 private uses
    "sandbox/sev/__init__.py": "from .. import cli\n",                      # sev -> cli
    "sandbox/sev/rmp.py": "from ..hypervisor.machine import _cpuid_leaf\n",  # sev -> hv, private
    "sandbox/hypervisor/__init__.py": "",
    "sandbox/hypervisor/machine.py": "from ..cli.run import main\n",        # non-cli -> cli
    "sandbox/fuzz/__init__.py": "",
    "sandbox/fuzz/case.py": "def h(self):\n    import json\n    return self._x\n",  # function import
    "sandbox/hypervisor/guest.py": "from ..debug import timeline\n",       # hypervisor -> debug
    "sandbox/debug/__init__.py": "",
    "sandbox/debug/timeline.py": "from ..hypervisor import machine\n",     # allowed: debug is above
    "sandbox/cli/__init__.py": "from .run import main\n",                   # allowed
    "sandbox/cli/run.py": "def main():\n    from rich.table import Table\n",
}


def test_checker_reports_each_rule(tmp_path):
    for rel, text in SYNTHETIC.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    imps = imports(tmp_path)
    got = {rule: [str(v) for v in check(imps)] for rule, check in LAYER_RULES.items()}
    assert got == {
        "svm-memory-below-the-rest": [
            "sandbox/memory/mmu.py:4: sandbox.memory.mmu -> sandbox.fuzz.case",
            "sandbox/svm/cpu.py:2: sandbox.svm.cpu -> sandbox.hypervisor.machine"],
        "memory-below-svm": ["sandbox/memory/mmu.py:3: sandbox.memory.mmu -> sandbox.svm.cpu"],
        "sev-below-hypervisor": [
            "sandbox/sev/__init__.py:1: sandbox.sev -> sandbox.cli",
            "sandbox/sev/rmp.py:1: sandbox.sev.rmp -> sandbox.hypervisor.machine"],
        "cli-on-top": [
            "sandbox/hypervisor/machine.py:1: sandbox.hypervisor.machine -> sandbox.cli.run",
            "sandbox/sev/__init__.py:1: sandbox.sev -> sandbox.cli"],
        "arch-at-the-bottom": ["sandbox/arch.py:1: sandbox.arch -> sandbox.svm.cpu"],
        "debug-above-the-machine": [
            "sandbox/hypervisor/guest.py:1: sandbox.hypervisor.guest -> sandbox.debug.timeline"],
    }
    allowed = {("sandbox.cli.run", "rich"): "test"}
    assert [str(v) for v in function_import_violations(imps, allowed)] == [
        "sandbox/fuzz/case.py:2: sandbox.fuzz.case -> json",
        "sandbox/svm/cpu.py:2: sandbox.svm.cpu -> sandbox.hypervisor.machine"]
    assert function_import_violations(imps, {}) != function_import_violations(imps, allowed)
    uses = private_uses(tmp_path)
    assert [str(v) for v in private_violations(uses, {("sandbox.svm.cpu", "_uch"): "test"})] == [
        "sandbox/sev/rmp.py:1: sandbox.sev.rmp uses from ..hypervisor.machine import _cpuid_leaf",
        "sandbox/svm/cpu.py:5: sandbox.svm.cpu uses other._ivec",
        "sandbox/svm/cpu.py:5: sandbox.svm.cpu uses self_._x"]
    assert len(private_violations(uses, {})) == 4
