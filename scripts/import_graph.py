"""The import graph of `src/minpro_cli` and the layering rule it must keep.

    python scripts/import_graph.py            # the graph as Mermaid and the floors, for docs/architecture.md
    python scripts/import_graph.py --check    # exit 1 naming every import that breaks the rule

Every module belongs to one layer (LAYERS, lowest first). A module may import only modules of
its own layer or below, never a stage from a stage, and the graph has no cycle. Imports inside
functions count: a lazy import is still a dependency. tests/test_architecture.py runs the check.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "minpro_cli"

# the layer of each top-level module or package (a package's submodules share its layer)
LAYERS: dict[str, list[str]] = {
    "basics": ["errors", "console", "fileio", "schedule", "hardware"],
    "formats": ["rollouts", "rundir", "taskfiles", "tasks", "probe_results"],
    "plugins": ["objectives", "verifiers", "registry", "advantages", "ratiostats", "correction"],
    "recipe": ["sections", "config"],
    "models": ["attention", "lora", "weightsync", "logprobs", "modeling", "samplers", "distributed", "checkpoints", "trackers", "plots"],
    "work": ["sampling", "heldout", "penalties", "anchors", "step", "rounds", "dedicated", "resume"],
    "stages": ["rollout", "train", "eval", "inspect_ratios", "probe", "sweep", "report", "convert", "export", "verl_rollouts", "scaffold",
               "conformance", "launcher", "doctor"],
    "cli": ["cli_support", "cli_tools", "cli", "__main__"],
}
STAGES = "stages"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def imports_of(path: Path) -> set[str]:
    """minpro_cli modules that `path` imports anywhere in its body (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            parts = package.split(".") if package else []
            base = parts[: len(parts) - node.level + 1]
            if node.module:
                found.add(".".join([*base, node.module]))
            else:  # `from .. import d`: the names are modules
                found |= {".".join([*base, a.name]) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minpro_cli."):
            found.add(node.module.removeprefix("minpro_cli."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("minpro_cli.") for a in node.names if a.name.startswith("minpro_cli.")}
    return {m for m in found if m and m != name}


def graph() -> dict[str, set[str]]:
    """Top-level module → the top-level modules it imports (a package counts as one)."""
    out: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        top = module_name(path).split(".")[0]
        if top == "__init__":
            continue
        out.setdefault(top, set()).update(m.split(".")[0] for m in imports_of(path))
    return {m: deps - {m} for m, deps in out.items()}


def layer_of(module: str) -> str:
    for layer, members in LAYERS.items():
        if module in members:
            return layer
    raise KeyError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")


def violations(edges: dict[str, set[str]]) -> list[str]:
    order = list(LAYERS)
    found = [f"{m}: in no layer (add it to LAYERS)" for m in edges if not any(m in v for v in LAYERS.values())]
    if found:
        return found
    for module, deps in sorted(edges.items()):
        for dep in sorted(deps):
            here, there = layer_of(module), layer_of(dep)
            if order.index(there) > order.index(here):
                found.append(f"{module} ({here}) imports {dep} ({there}), a higher layer")
            elif here == there == STAGES:
                found.append(f"{module} imports {dep}: a stage imports another stage")
    return found + [f"import cycle: {' → '.join(c)}" for c in cycles(edges)]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each module that lies on one (depth-first search)."""
    state: dict[str, str] = {}
    found: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(edges.get(module, ())):
            if state.get(dep) == "open":
                found.append([*path[path.index(dep):], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    return found


def floors(edges: dict[str, set[str]]) -> dict[str, int]:
    """Floor of a module: 1 + the highest floor it imports (1 for a module that imports none; an
    import back into a cycle counts as floor 0, so a cyclic graph still gets numbers)."""
    memo: dict[str, int] = {}

    def floor(module: str) -> int:
        if module not in memo:
            memo[module] = 0
            memo[module] = 1 + max((floor(d) for d in edges.get(module, ())), default=0)
        return memo[module]

    return {m: floor(m) for m in edges}


def mermaid(edges: dict[str, set[str]]) -> str:
    lines = ["```mermaid", "flowchart BT"]
    for layer, members in LAYERS.items():
        lines.append(f"  subgraph {layer}")
        lines += [f"    {m.strip('_')}[{m}]" for m in members if m in edges]
        lines.append("  end")
    lines += [f"  {m.strip('_')} --> {d.strip('_')}" for m in sorted(edges) for d in sorted(edges[m])]
    return "\n".join([*lines, "```"])


def main(argv: list[str]) -> int:
    edges = graph()
    if "--check" in argv:
        problems = violations(edges)
        print("\n".join(problems) or f"{len(edges)} modules, {sum(map(len, edges.values()))} imports: layering holds")
        return 1 if problems else 0
    print(mermaid(edges))
    by_floor: dict[int, list[str]] = {}
    for module, floor in floors(edges).items():
        by_floor.setdefault(floor, []).append(module)
    print("\n| floor | modules |\n|---|---|")
    for floor in sorted(by_floor):
        print(f"| {floor} | {', '.join(sorted(by_floor[floor]))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
