"""House rules checked on the source itself: no import circles, every public name in `__all__`,
the Mixer speaks to the Rack only through fluxrig.wire (and the public modules it names).

Static (ast) so that nothing is imported: a circle that only bites in one import order is found
whatever order the tests run in. Only module-level imports count; an import inside a function is
the deliberate way to load something lazily (nats only when joined, the Mixer's HTTP stack).
"""

from __future__ import annotations

import ast
import os

from helpers import ROOT

PACKAGES = {"fluxrig": os.path.join(ROOT, "fluxrig"), "fluxrig_mixer": os.path.join(ROOT, "mixer", "fluxrig_mixer")}
SKIP_DIRS = {"__pycache__"}


def _modules() -> dict[str, tuple[str, bool]]:
    """module name -> (path, is_package)."""
    out = {}
    for _pkg, root in PACKAGES.items():
        base = os.path.dirname(root)
        for d, dirs, files in os.walk(root):
            dirs[:] = [x for x in dirs if x not in SKIP_DIRS]
            for f in files:
                if not f.endswith(".py"):
                    continue
                path = os.path.join(d, f)
                name = os.path.relpath(path, base)[:-3].replace(os.sep, ".")
                is_pkg = name.endswith(".__init__")
                out[name[: -len(".__init__")] if is_pkg else name] = (path, is_pkg)
    return out


MODULES = _modules()


def _top_imports(name: str) -> set[str]:
    """Modules of our packages that `name` imports at module level (not under TYPE_CHECKING)."""
    path, is_pkg = MODULES[name]
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()

    def resolve(mod: str) -> str | None:
        while mod and mod not in MODULES:
            mod = mod.rpartition(".")[0]
        return mod or None

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)
                continue
            if isinstance(node, ast.Import):
                for a in node.names:
                    if (m := resolve(a.name)) is not None:
                        found.add(m)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1])
                    mod = f"{base}.{node.module}" if node.module else base
                else:
                    mod = node.module or ""
                for a in node.names:  # `from pkg import submodule` imports the submodule
                    sub = f"{mod}.{a.name}"
                    if sub in MODULES:
                        found.add(sub)
                if (m := resolve(mod)) is not None:
                    found.add(m)

    visit(tree.body)
    found.discard(name)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def _graph() -> dict[str, set[str]]:
    graph = {name: _top_imports(name) for name in MODULES}
    # A package importing its own submodules (to re-export them) is not a circle of design.
    for name, (_path, is_pkg) in MODULES.items():
        if is_pkg:
            graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    return graph


def test_no_import_circles():
    cycles = _cycles(_graph())
    assert not cycles, "import circles (module-level imports): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_public_name_is_in_all():
    problems = []
    for name, (path, _is_pkg) in sorted(MODULES.items()):
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        public = [n.name for n in tree.body
                  if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not n.name.startswith("_")]  # fmt: skip
        declared = None
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
            ):
                declared = ast.literal_eval(node.value)
        if declared is None:
            if public:
                problems.append(f"{name}: no __all__ (public: {', '.join(public)})")
            continue
        missing = [p for p in public if p not in declared]
        if missing:
            problems.append(f"{name}: not in __all__: {', '.join(missing)}")
    assert not problems, "\n".join(problems)


def test_the_mixer_never_imports_the_rack_agent():
    offenders = {}
    for name, (path, _is_pkg) in MODULES.items():
        if not name.startswith("fluxrig_mixer"):
            continue
        text = open(path, encoding="utf-8").read()
        bad = [line.strip() for line in text.splitlines()
               if ("fluxrig.agent" in line or "from fluxrig import agent" in line) and "import" in line]  # fmt: skip
        if bad:
            offenders[name] = bad
    assert not offenders, f"the Mixer imports fluxrig.agent (use fluxrig.wire): {offenders}"
