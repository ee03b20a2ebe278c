"""The house rules that a test can check: no import circle, no oversized source file."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "amendlm"
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """amendlm modules imported anywhere in the file (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("amendlm"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("amendlm"))
    return found


def test_no_import_circle_in_the_package():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}

    def reaches(start: str, target: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node == target:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(graph.get(node, ()))
        return False

    # packages' __init__ files only re-export lazily; a circle between two real modules is the fault
    circles = sorted((a, b) for a in graph for b in graph[a]
                     if not modules[a].name == "__init__.py" and not modules[b].name == "__init__.py" and reaches(b, a))
    assert not circles, f"import circles: {circles}"


def test_the_cli_is_imported_by_no_command_module():
    # __main__.py (``python -m amendlm``) is an entry point like the console script: nothing imports it
    importers = [p.name for p in PACKAGE.rglob("*.py") if "amendlm.cli" in _imports(p) and p.name != "__main__.py"]
    assert importers == []


def test_no_source_file_over_the_house_limit():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_make_results_runs_the_command_each_results_page_records():
    """`make results` regenerates every table: each recorded (non-quick) results.json command is one of
    the Makefile's RESULTS_COMMANDS, options and all (a table made with other options is not remade)."""
    import json
    import re
    import shlex

    repo = PACKAGE.parent.parent
    makefile = (repo / "Makefile").read_text()
    block = re.search(r"^RESULTS_COMMANDS := \\\n((?:\t.*\n)+)", makefile, re.M)
    assert block, "RESULTS_COMMANDS not found in the Makefile"
    commands = {f"python experiments/{c}" for c in shlex.split(block.group(1).replace("\\\n", " "))}
    recorded = {p.parent.name: json.loads(p.read_text()) for p in (repo / "results").glob("*/results.json")}
    assert recorded
    for name, data in recorded.items():
        if not data.get("quick"):
            assert data["command"] in commands, f"results/{name}: `{data['command']}` is not in the Makefile's RESULTS_COMMANDS"
    assert len(commands) == len([d for d in recorded.values() if not d.get("quick")]), sorted(commands)
