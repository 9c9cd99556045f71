"""Who may import what: the console and the scenarios use djinnd's public face only, djinnd imports
neither, and no two modules import each other (imports inside functions count too)."""

import ast

import djinnd

from conftest import ROOT


def _imports(path) -> list[str]:
    """Every module `path` imports, as absolute dotted names (with the names taken from it)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            out += [f"{base}:{a.name}" for a in node.names]
    return out


def _modules(*folders):
    return [p for f in folders for p in sorted((ROOT / f).rglob("*.py"))]


def test_the_console_and_the_scenarios_use_only_djinnds_public_face():
    wrong = []
    for path in _modules("console", "scenarios"):
        for imp in _imports(path):
            module, _, name = imp.partition(":")
            if module.startswith("djinnd.") or (module == "djinnd" and name and name not in djinnd.__all__):
                wrong.append(f"{path.relative_to(ROOT)}: {imp}")
    assert not wrong


def test_djinnd_imports_neither_the_console_nor_the_scenarios():
    wrong = [f"{p.relative_to(ROOT)}: {imp}" for p in _modules("djinnd") for imp in _imports(p)
             if imp.split(":")[0].split(".")[0] in ("console", "scenarios")]
    assert not wrong


def test_no_two_modules_import_each_other():
    graph = {}
    for path in _modules("djinnd", "console", "scenarios"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for imp in _imports(path):
            module, _, attr = imp.partition(":")
            deps.add(f"{module}.{attr}" if f"{module}.{attr}".replace(".", "/") + ".py" in _paths() else module)
        graph[name] = deps - {name}
    cycles = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps if a in graph.get(b, ())})
    assert not cycles


_all_paths = None


def _paths() -> set[str]:
    global _all_paths
    if _all_paths is None:
        _all_paths = {str(p.relative_to(ROOT)) for p in _modules("djinnd", "console", "scenarios")}
    return _all_paths
