"""The package's shape: no import circle, the readers import no model, the README names every
module. Run: python -m pytest -q tests/test_layout.py"""
import ast
import re

from conftest import ROOT

PACKAGE = ROOT / "speechllm"


def imports() -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in the file, functions included)."""
    names = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {}
    for path in PACKAGE.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        graph[path.stem] = deps & names - {path.stem}
    return graph


def test_no_import_circle_and_no_import_inside_a_function():
    graph, done, path = imports(), set(), []

    def visit(m):
        assert m not in path, f"import circle: {' -> '.join(path[path.index(m):] + [m])}"
        if m in done:
            return
        path.append(m)
        for d in sorted(graph[m]):
            visit(d)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)
    for path_ in PACKAGE.glob("*.py"):
        tree = ast.parse(path_.read_text())
        top = {id(n) for n in tree.body}
        inner = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1 and id(n) not in top]
        assert not inner, f"{path_.name}: package imports inside functions at lines {inner}"


def test_the_readers_build_no_model():
    graph = imports()
    assert graph["weights"] == graph["config"] == set()
    assert graph["convert"] == {"weights"}


def test_readme_layout_names_every_module():
    table = ROOT.joinpath("README.md").read_text().split("## Layout", 1)[1]
    named = set(re.findall(r"`(?:speechllm/)?(\w+)\.py`", table))
    assert {p.stem for p in PACKAGE.glob("*.py")} <= named, sorted({p.stem for p in PACKAGE.glob("*.py")} - named)


def test_only_the_integrations_import_pipecat():
    """Pipecat is an optional extra: the package, the scripts and the other tests never import it."""
    files = [p for p in PACKAGE.rglob("*.py") if p.parent.name != "integrations"] + list(ROOT.glob("*.py"))
    files += [p for p in (ROOT / "tests").glob("*.py") if p.name != "test_pipecat.py"]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            assert not any(n.split(".")[0] == "pipecat" for n in names), f"{path.relative_to(ROOT)} imports pipecat"
    tree = ast.parse((PACKAGE / "integrations" / "pipecat.py").read_text())  # where it is imported: at the top
    assert any(isinstance(n, ast.ImportFrom) and n.module.startswith("pipecat.") for n in tree.body)
