"""The package's shape: imports point one way with no cycle, one prefix for what we set on foreign objects,
one reader of environment switches, and in-function imports only where they defer something heavy."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "openautoglm"
ROOT = SRC.parents[1]


def _sources():
    return sorted(p for p in SRC.rglob("*.py"))


def test_no_import_cycle():
    """No two modules of openautoglm reach each other through imports (in-function imports included; an import
    under ``if TYPE_CHECKING:`` is not one: it never runs)."""
    grimp = pytest.importorskip("grimp")
    g = grimp.build_graph("openautoglm", exclude_type_checking_imports=True)
    mods = sorted(g.modules)
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components, iteratively deep enough for ~120 modules
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g.find_modules_directly_imported_by(v)):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in mods:
        if m not in index:
            visit(m)
    assert not cycles, f"import cycles: {cycles}"


def test_layers_contract_holds():
    """The import-linter layers contract of pyproject.toml (scripts/test.sh runs it too)."""
    cli = pytest.importorskip("importlinter.cli")
    assert cli.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0


def test_attributes_on_foreign_objects_use_one_prefix():
    """Every attribute openautoglm sets on models, modules and configs is ``_openautoglm_*`` and listed in
    ``_util/attrs.py``; the old ``_oag_`` stamps are gone."""
    from openautoglm._util import attrs

    found = set()
    for p in _sources():
        text = p.read_text()
        assert "_oag_" not in text and "oag_kv_index" not in text, p
        found |= set(re.findall(r"_openautoglm_[a-z_]+", text))
    assert found <= set(attrs.ALL), sorted(found - set(attrs.ALL))
    assert all(a.startswith(attrs.PREFIX) for a in attrs.ALL)


def test_environment_switches_are_read_in_one_place():
    """Only ``_util/flags.py`` names our environment switches; library code never writes the environment,
    except the Generator's scoped inductor cache folder (restored after its calls) and the CLI's allocator
    setting (the application, not the library)."""
    for p in _sources():
        rel = p.relative_to(SRC).as_posix()
        text = p.read_text()
        if rel != "_util/flags.py":
            assert not re.search(r"[\"']OPENAUTOGLM_[A-Z_]+[\"']", text), f"{rel} names a switch: use _util.flags"
            assert "TRITON_INTERPRET\")" not in text and "TRITON_INTERPRET')" not in text, rel
        writes = re.findall(r"os\.environ(?:\.setdefault|\.pop|\[[^\]]+\]\s*=)", text)
        allowed = {"generation/generator.py": 3, "cli/_app.py": 1}
        assert len(writes) <= allowed.get(rel, 0), (rel, writes)


def test_in_function_imports_only_defer_heavy_modules():
    """Imports of openautoglm modules inside functions are allowed only where they defer something heavy: the
    Triton kernel sources (importing them imports Triton), the CLI's commands (``openautoglm --help`` must not
    wait for transformers' cache and generation modules) and the package root's lazy names and plugin wiring."""
    allowed_files = re.compile(r"^(cli/|__init__\.py$)")
    for p in _sources():
        rel = p.relative_to(SRC).as_posix()
        if allowed_files.match(rel):
            continue
        tree = ast.parse(p.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("openautoglm")):
                    names = [a.name for a in node.names]
                    target = f"{node.module or ''}:{','.join(names)}"
                    assert "triton_" in target, f"{rel}:{node.lineno} imports {target} inside a function"


def test_tests_import_nothing_from_benchmarks():
    """What tests and benchmarks both need lives in the package (or a test helper), never in benchmarks/."""
    for p in sorted(Path(__file__).parent.rglob("*.py")):
        text = p.read_text()
        assert not re.search(r"^\s*(from|import) benchmarks\b", text, re.M), p
        assert not re.search(r"sys\.path\.\w+\(.*benchmarks", text), p  # no import through a path hack either
