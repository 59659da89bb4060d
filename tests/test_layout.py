"""The dependency picture stays one-way: the views over the application layer over the engine."""
import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "core"
# The command line is a view of the engine, as the dashboard is: it may use core.app (heatmap overlays). So is
# the inspection service (core/line/serve.py), whose ?heatmap=true answer is the same overlay as predict's.
VIEWS_IN_CORE = {"cli.py", "__main__.py", "line/serve.py"}


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module a file imports, relative imports resolved."""
    package = ".".join(path.relative_to(CORE.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return found


def test_core_never_imports_streamlit():
    for path in CORE.rglob("*.py"):
        assert not any(m.split(".")[0] == "streamlit" for m in imported_modules(path)), path


def test_the_engine_never_imports_the_application_layer():
    for path in CORE.rglob("*.py"):
        rel = path.relative_to(CORE)
        if rel.parts[0] == "app" or str(rel) in VIEWS_IN_CORE:
            continue
        assert not any(m == "core.app" or m.startswith("core.app.") for m in imported_modules(path)), rel
