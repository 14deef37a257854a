"""The package's layers: every module of instunique imports only from its own layer or the
ones below it, so data flows one way (objectives know nothing of the base models, the
models nothing of the training loop)."""
import ast
import os

import instunique

PACKAGE = os.path.dirname(instunique.__file__)
# Lowest first. A top-level module or subpackage of instunique sits in exactly one layer.
LAYERS = [
    {"rng", "distributed", "transforms", "checkpoint"},
    {"data"},
    {"adapter"},
    {"objectives", "backbones", "segmenters"},
    {"meta_arch", "evaluation", "visualization"},
    {"solver"},
    {"engine"},
    {"config", "__init__"},  # aggregators: they gather every part's keys and registrations
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _part(parts):
    return parts[0] if parts else "__init__"


def imports_between_parts():
    """[(importing part, imported part, file, line)] over every import of the package."""
    found = []
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, PACKAGE)[:-3].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            here = _part(rel)
            package = rel if name == "__init__.py" else rel[:-1]  # where "." points
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.ImportFrom) and node.level:
                    base = package[:len(package) - node.level + 1]
                    targets = [base + (node.module.split(".") if node.module else [])]
                    if not node.module:  # from . import a, b
                        targets = [base + [a.name] for a in node.names]
                elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                        "instunique"):
                    targets = [node.module.split(".")[1:]]
                elif isinstance(node, ast.Import):
                    targets = [a.name.split(".")[1:] for a in node.names
                               if a.name.startswith("instunique.")]
                else:
                    continue
                for target in targets:
                    there = _part(target)
                    if there != here:
                        found.append((here, there, os.path.relpath(path, PACKAGE), node.lineno))
    return found


def test_every_part_has_a_layer():
    parts = {_part(os.path.splitext(n)[0].split(".")) for n in os.listdir(PACKAGE)
             if n.endswith(".py") or os.path.isdir(os.path.join(PACKAGE, n, ""))
             and os.path.isfile(os.path.join(PACKAGE, n, "__init__.py"))}
    assert parts - set(RANK) == set(), "place the new part in LAYERS"


def test_no_import_runs_up():
    found = imports_between_parts()
    assert any(a == "engine" and b == "solver" for a, b, *_ in found)  # the walk sees imports
    upward = [f"{file}:{line}: {a} imports {b}" for a, b, file, line in found
              if RANK[b] > RANK[a]]
    assert upward == [], "\n".join(upward)
