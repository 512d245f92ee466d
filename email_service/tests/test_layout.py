"""The app's shape, read from its source: no import cycle, one writer of `status`, tasks by name."""

import ast
from pathlib import Path

APP = Path(__file__).resolve().parent.parent
# Modules Celery or Django load by themselves, which nothing in the app needs to import.
EDGES = {"email_service.tasks"}


def _modules():
    """Map each module of the app (tests and migrations aside) to its parsed source."""
    modules = {}
    for path in sorted(APP.rglob("*.py")):
        parts = path.relative_to(APP.parent).with_suffix("").parts
        if "tests" in parts or "migrations" in parts:
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = (path, ast.parse(path.read_text(), filename=str(path)))
    return modules


def _package(name, path):
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _imports(name, path, tree, known):
    """Return the app's modules that `name` imports anywhere in its source, functions included."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _package(name, path).split(".")
                anchor = ".".join(package[: len(package) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            # `from . import conf` names a module; `from .models import X` names an attribute.
            found.update(f"{base}.{alias.name}" for alias in node.names)
    # A package's __init__ is empty here: only modules count as edges.
    return {module for module in found if module in known and module != name and module != "email_service"}


def _graph():
    modules = _modules()
    return {name: _imports(name, path, tree, modules) for name, (path, tree) in modules.items()}


def _cycle(graph):
    """Return one import cycle as a list of modules, or None."""
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return trail[trail.index(target) :] + [target]
            if target not in state:
                cycle = visit(target, trail + [target])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [node])
            if cycle:
                return cycle
    return None


def test_the_graph_sees_function_level_imports():
    graph = _graph()
    # Known edges, one at module level and one inside a function (apps.ready imports signals).
    assert "email_service.models" in graph["email_service.outbox"]
    assert "email_service.signals" in graph["email_service.apps"]


def test_a_cycle_would_be_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_app():
    assert _cycle(_graph()) is None


def test_tasks_are_imported_by_nothing_in_the_app():
    importers = sorted(name for name, targets in _graph().items() if targets & EDGES)
    assert importers == []


def _status_writes(tree):
    """Yield the line of every place in `tree` that assigns a `status` or writes one to the database."""
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        if any(isinstance(target, ast.Attribute) and target.attr == "status" for target in targets):
            yield node.lineno
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            method = node.func.attr
            keywords = {keyword.arg for keyword in node.keywords}
            if method in {"update", "create", "bulk_create", "get_or_create", "update_or_create"} and (
                "status" in keywords or "defaults" in keywords and _mentions_status(node)
            ):
                yield node.lineno
            if method in {"save", "bulk_update"} and _mentions_status(node):
                yield node.lineno


def _mentions_status(call):
    return any(
        isinstance(node, ast.Constant) and node.value == "status"
        for keyword in call.keywords
        for node in ast.walk(keyword.value)
    ) or any(
        isinstance(node, ast.Constant) and node.value == "status"
        for arg in call.args
        for node in ast.walk(arg)
    )


def test_the_status_check_finds_every_kind_of_write():
    source = """
row.status = "SENT"
rows.update(status="SENT")
Model.objects.create(full_name="x", status="FAILED")
row.save(update_fields=["status"])
rows.filter(status="PENDING").update(error_message="")
"""
    assert list(_status_writes(ast.parse(source))) == [2, 3, 4, 5]


def test_no_status_is_written_outside_models():
    writes = {
        str(path.relative_to(APP.parent)): lines
        for name, (path, tree) in _modules().items()
        if name != "email_service.models" and (lines := list(_status_writes(tree)))
    }
    assert writes == {}
