"""The three floors import downwards only, and their public surfaces are honest."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"


def imported_roots(package: str) -> set[str]:
    """Return the top-level names every module of a package imports."""
    roots = set()
    for path in (SRC / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                roots.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots.add(node.module.split(".")[0])
    return roots


class TestLayers:
    """Arrows point down: wsgi -> adapters -> core."""

    def test_core_imports_only_the_standard_library_attrs_and_cattrs(self):
        """dais_core is pure: no framework, driver or sibling package."""
        allowed = set(sys.stdlib_module_names) | {
            "attrs",
            "cattrs",
            "dais_core",
            "__future__",
        }
        assert imported_roots("dais_core") - allowed == set()

    def test_core_does_no_io(self):
        """dais_core imports none of the standard library's I/O modules."""
        io_modules = {
            "os",
            "io",
            "socket",
            "sqlite3",
            "subprocess",
            "logging",
            "shutil",
            "pathlib",
            "tempfile",
            "http",
            "urllib3",
            "select",
            "asyncio",
        }
        assert imported_roots("dais_core") & io_modules == set()

    def test_adapters_never_import_the_web_layer(self):
        """dais_adapters does not know dais_wsgi exists."""
        assert "dais_wsgi" not in imported_roots("dais_adapters")
        assert "falcon" not in imported_roots("dais_adapters")


@pytest.mark.parametrize("package", ["dais_core", "dais_adapters", "dais_wsgi"])
def test_all_names_resolve(package):
    """Every name a package lists in __all__ exists, once."""
    module = importlib.import_module(package)
    assert len(module.__all__) == len(set(module.__all__))
    for name in module.__all__:
        assert hasattr(module, name), name


def test_core_reexports_every_public_name_of_its_rule_modules():
    """What the core's modules publish is reachable from dais_core itself."""
    core = importlib.import_module("dais_core")
    for name in ("rules", "policies", "usecases", "values", "errors", "ports"):
        module = importlib.import_module(f"dais_core.{name}")
        missing = {n for n in module.__all__ if n.isidentifier() and n[0] != "_"} - set(
            core.__all__
        )
        assert missing <= {
            "MAX_ROUTE_LENGTH",
            "STATUS_BY_ERROR",
            "require_permission",
        }, missing
