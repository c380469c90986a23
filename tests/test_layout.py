"""The house rules of BUILD.md's layout, checked from the source text (nothing imported).

lint-imports (the README's test command) checks the layers between packages; these
check what it does not: no import cycle anywhere (inside a package too), no module
over 500 lines, a handful of plain modules at most directly under ``keras_defense/``.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "keras_defense"
MAX_LINES = 500
MAX_TOP_LEVEL_MODULES = 5


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in ROOT.rglob("*.py"):
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def _resolve(name: str, modules) -> str | None:
  """The module ``name`` is, or the package that holds it (an imported attribute)."""
  while name and name not in modules:
    name = name.rpartition(".")[0]
  return name or None


def import_graph() -> dict[str, set[str]]:
  """Module -> the keras_defense modules it imports (``__init__`` is its package)."""
  modules = _modules()
  graph = {m: set() for m in modules}
  for module, path in modules.items():
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          up = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(up + ([base] if base else []))
        names = [f"{base}.{a.name}" for a in node.names]
      for name in names:
        target = _resolve(name, modules)
        if target and target != module:
          graph[module].add(target)
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan, iterative)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []
  counter = 0
  for start in graph:
    if start in index:
      continue
    work = [(start, iter(sorted(graph[start])))]
    index[start] = low[start] = counter
    counter += 1
    stack.append(start)
    on_stack.add(start)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = counter
          counter += 1
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph[child]))))
        elif child in on_stack:
          low[node] = min(low[node], index[child])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[node])
      if low[node] == index[node]:
        component = []
        while True:
          member = stack.pop()
          on_stack.discard(member)
          component.append(member)
          if member == node:
            break
        if len(component) > 1:
          found.append(sorted(component))
  return found


def test_the_cycle_finder_finds_a_cycle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert cycles(graph) == [["a", "b", "c"]]
  assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
  graph = import_graph()
  assert "keras_defense.attacks.memory" in graph["keras_defense.evaluation.robustness"]
  assert cycles(graph) == []


def test_no_module_over_500_lines():
  long = {str(p.relative_to(ROOT.parent)): n for p in ROOT.rglob("*.py")
          if (n := len(p.read_text().splitlines())) > MAX_LINES}
  assert long == {}, f"split these along their seams (BUILD.md): {long}"


def test_a_handful_of_plain_modules_at_the_top():
  top = sorted(p.name for p in ROOT.glob("*.py"))
  assert "__init__.py" in top and len(top) <= MAX_TOP_LEVEL_MODULES, top
