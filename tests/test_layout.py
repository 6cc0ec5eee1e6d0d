"""The package's shape: console scripts installed by `pip install -e .` (what `make setup` runs), and
the import rules of docs/architecture.md."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {
    "prolong-data": "prolong.data.cli:main",
    "prolong-cpt": "prolong.run_cpt:cli",
    "prolong-sft": "prolong.run_sft:cli",
    "prolong-eval": "evaluation.run:main",
}


def test_console_scripts_are_installed():
    installed = {ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.name in SCRIPTS}
    assert installed == SCRIPTS
    bindir = os.path.dirname(sys.executable)
    for name in SCRIPTS:
        assert os.access(os.path.join(bindir, name), os.X_OK), f"{name} not in {bindir}: run `make setup`"


BIN = os.path.dirname(sys.executable)


@pytest.mark.slow  # a Python start-up with torch per case
@pytest.mark.parametrize("command, expected", [
    ([os.path.join(BIN, "prolong-cpt")], "--max_steps"),
    ([os.path.join(BIN, "prolong-eval")], "--lengths"),
    ([sys.executable, os.path.join(ROOT, "prolong", "run_sft.py")], "--max_length"),  # as README shows
], ids=["prolong-cpt", "prolong-eval", "python prolong/run_sft.py"])
def test_entry_point_help(command, expected, tmp_path):
    """Run from outside the checkout, with no sys.path edit: `prolong` comes from the editable install."""
    result = subprocess.run([*command, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:") and expected in result.stdout, result.stdout[:300]


# ---------------------------------------------------------------------------------------------
# The import rules of docs/architecture.md, read from the source (every import, also those inside
# functions), not from what happens to be loaded.

ENTRY_SCRIPTS = {"prolong.run_cpt", "prolong.run_sft", "prolong.demo.__main__", "prolong.data.cli",
                 "prolong.data.__main__", "evaluation.run"}
# prolong modules that import nothing from training and that any CLI may use
SHARED = {"prolong", "prolong.errors", "prolong.redaction", "prolong.model_card", "prolong.yaml_files", "prolong.io"}
# what every loader reads names and files with (prolong/io/): below the tools that use it
IO_PACKAGE = "prolong.io"
USES_IO = ("prolong.training", "prolong.checkpoint", "prolong.parallel", "evaluation", "prolong.demo", "prolong.data")
# the training side: what the offline data tools and evaluation must not import
TRAINING_PACKAGES = ("prolong.training", "prolong.checkpoint", "prolong.parallel")
TRAINING_MODULES = {"prolong.config", "prolong.model", "prolong.sft_data", "prolong.runtime", "prolong.run_cpt",
                    "prolong.run_sft"}
# imports the restructure still has to remove; do not add to it
KNOWN_EXCEPTIONS: set = set()


def _module_name(path):
    parts = list(os.path.relpath(path, ROOT)[:-3].split(os.sep))
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree, at_import_time: bool):
    """Import nodes; with at_import_time, only those run when the module is imported (not in functions)."""
    import ast

    if not at_import_time:
        yield from (node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)))
        return
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))


def import_graph(at_import_time: bool = False) -> dict[str, set[str]]:
    """Module -> the prolong/evaluation modules it imports (`from pkg import submodule` counts as the
    submodule, not as the package's __init__)."""
    import ast

    paths = {}
    for package in ("prolong", "evaluation"):
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            paths.update({_module_name(os.path.join(folder, f)): os.path.join(folder, f)
                          for f in files if f.endswith(".py")})
    graph = {}
    for module, path in paths.items():
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        imported = set()
        for node in _imports(ast.parse(open(path, encoding="utf-8").read()), at_import_time):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                submodules = {f"{base}.{alias.name}" for alias in node.names} & paths.keys()
                imported |= submodules
                if len(submodules) < len(node.names):
                    imported.add(base)
        graph[module] = {name for name in imported if name in paths and name != module}
    return graph


def _is_training(module: str) -> bool:
    return module in TRAINING_MODULES or any(module == p or module.startswith(p + ".") for p in TRAINING_PACKAGES)


def _in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _is_shared(module: str) -> bool:
    return module in SHARED or _in_package(module, IO_PACKAGE)


def rule_violations(graph: dict[str, set[str]], exceptions=KNOWN_EXCEPTIONS) -> list[str]:
    violations = []
    # what prolong.parallel builds on (collator, attention backends) must not reach back into it
    under_parallel = {name for module, imported in graph.items() if module.startswith("prolong.parallel")
                      for name in imported if not name.startswith("prolong.parallel")}
    for module, imported in sorted(graph.items()):
        for name in sorted(imported):
            if (module, name) in exceptions:
                continue
            if name in ENTRY_SCRIPTS and module != name.rpartition(".")[0] + ".__main__":
                violations.append(f"{module} imports the entry script {name}")
            if module.startswith("prolong.data") and _is_training(name):
                violations.append(f"{module} (offline data tools) imports the training module {name}")
            if module.startswith("prolong.data") and name.startswith("prolong.demo"):
                violations.append(f"{module} (offline data tools) imports the demo module {name}")
            if module.startswith("evaluation") and _is_training(name):
                violations.append(f"{module} (evaluation) imports the training module {name}")
            if _is_shared(module) and _is_training(name):
                violations.append(f"{module} (shared by every CLI) imports the training module {name}")
            if _in_package(module, IO_PACKAGE) and (_is_training(name) or any(_in_package(name, p) for p in USES_IO)):
                violations.append(f"{module} (prolong.io) imports {name}, which builds on it")
            if module in under_parallel and name.startswith("prolong.parallel"):
                violations.append(f"{module} (used by prolong.parallel) imports {name} back")
    return violations


def test_import_rules_of_docs_architecture():
    graph = import_graph()
    assert {"prolong.run_cpt", "prolong.data.pack", "evaluation.runner"} <= graph.keys()  # the reader works
    violations = rule_violations(graph)
    assert not violations, "\n".join(violations)


def test_import_rules_catch_each_kind_of_violation():
    """The rules on a made-up graph: one import breaking each rule, and imports that are allowed."""
    planted = {"prolong.demo.cli": {"prolong.run_cpt"},                    # an entry script imported
               "prolong.data.pack": {"prolong.training.trainer"},          # data tools -> training
               "prolong.data.cli": {"prolong.demo.micro_data"},            # data tools -> demo
               "prolong.demo.micro_data": {"prolong.data.demo_corpus"},    # allowed: demo builds on data
               "evaluation.runner": {"prolong.model"},                     # evaluation -> training
               "prolong.errors": {"prolong.parallel.sequence"},            # shared -> training
               "prolong.io.hub": {"prolong.data.storage", "prolong.errors"},  # io -> a tool built on it
               "prolong.io.files": {"evaluation.tasks", "prolong.demo.cli"},  # io -> evaluation, demo
               "prolong.io.tokenizer": {"prolong.training.attention"},     # io (shared) -> training
               "prolong.demo.__main__": {"prolong.demo.cli"},              # allowed
               "prolong.data.__main__": {"prolong.data.cli"},              # allowed: its own package's entry script
               "prolong.parallel.sequence": {"prolong.training.attention"},  # allowed
               "prolong.training.attention": {"prolong.parallel.compat"},  # parallel <-> training
               "prolong.training.trainer": {"prolong.parallel.loader"},    # allowed: parallel does not use it
               "prolong.run_cpt": {"prolong.training.trainer", "prolong.data.pack"}}  # allowed
    assert sorted(rule_violations(planted, exceptions=set())) == [
        "evaluation.runner (evaluation) imports the training module prolong.model",
        "prolong.data.cli (offline data tools) imports the demo module prolong.demo.micro_data",
        "prolong.data.pack (offline data tools) imports the training module prolong.training.trainer",
        "prolong.demo.cli imports the entry script prolong.run_cpt",
        "prolong.errors (shared by every CLI) imports the training module prolong.parallel.sequence",
        "prolong.io.files (prolong.io) imports evaluation.tasks, which builds on it",
        "prolong.io.files (prolong.io) imports prolong.demo.cli, which builds on it",
        "prolong.io.hub (prolong.io) imports prolong.data.storage, which builds on it",
        "prolong.io.tokenizer (prolong.io) imports prolong.training.attention, which builds on it",
        "prolong.io.tokenizer (shared by every CLI) imports the training module prolong.training.attention",
        "prolong.training.attention (used by prolong.parallel) imports prolong.parallel.compat back",
    ]
    # an exception silences exactly its own pair
    assert len(rule_violations(planted, exceptions={("evaluation.runner", "prolong.model")})) == 10


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module, path):
        state[module] = 1
        for name in sorted(graph.get(module, ())):
            if state.get(name) == 1:
                return path[path.index(name):] + [name]
            if name not in state and (cycle := visit(name, path + [name])):
                return cycle
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def test_no_import_cycles():
    """At import time (inside functions, a lazy import may close a loop on purpose)."""
    cycle = import_cycle(import_graph(at_import_time=True))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    # the search on made-up graphs: a three-module loop is found, a diamond is not a cycle
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert import_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None


def stale_exceptions(graph: dict[str, set[str]], exceptions) -> list[tuple[str, str]]:
    """Listed exceptions whose import the code no longer makes."""
    return sorted(pair for pair in exceptions if pair[1] not in graph.get(pair[0], set()))


def test_known_exceptions_still_exist():
    """An exception that is gone must leave the list, so the rules only get stricter. The list is
    empty now; the check itself is shown on a made-up list, so that it is not only run on nothing."""
    graph = import_graph()
    assert stale_exceptions(graph, KNOWN_EXCEPTIONS) == []
    present = ("prolong.run_cpt", "prolong.config")  # an import the code makes
    gone = ("prolong.data.pack", "prolong.training.trainer")  # one it does not
    assert "prolong.config" in graph["prolong.run_cpt"]
    assert stale_exceptions(graph, {present, gone}) == [gone]
    assert stale_exceptions(graph, {present}) == []


# ---------------------------------------------------------------------------------------------
# prolong/training/: the trainers build on one module per job, never the reverse

TRAINERS = {"prolong.training.trainer", "prolong.training.sft_trainer"}
TRAINER_PARTS = {"prolong.training.callbacks", "prolong.training.throughput", "prolong.training.hub_push",
                 "prolong.training.stage_handoff", "prolong.training.mixture", "prolong.training.loss"}


def trainer_part_violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{part} imports the trainer {name}" for part in TRAINER_PARTS
                  for name in graph.get(part, set()) & TRAINERS)


def private_imports(sources: dict[str, str]) -> list[str]:
    """`from prolong... import _name` in modules of prolong.training and the entry scripts: a private
    name used by another module belongs in its public interface."""
    import ast

    found = []
    for module, source in sorted(sources.items()):
        if not (module.startswith("prolong.training") or module in ("prolong.run_cpt", "prolong.run_sft")):
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("prolong")):
                found += [f"{module} imports {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    return found


def _sources() -> dict[str, str]:
    sources = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "prolong")):
        for f in files:
            if f.endswith(".py"):
                sources[_module_name(os.path.join(folder, f))] = open(os.path.join(folder, f), encoding="utf-8").read()
    return sources


def test_training_modules_keep_one_job_each():
    graph = import_graph()
    assert TRAINER_PARTS | TRAINERS <= graph.keys()  # the modules exist
    assert not trainer_part_violations(graph), trainer_part_violations(graph)
    assert not private_imports(_sources()), private_imports(_sources())
    # the rules on made-up code: each kind of violation is found
    assert trainer_part_violations({"prolong.training.callbacks": {"prolong.training.trainer"}}) == [
        "prolong.training.callbacks imports the trainer prolong.training.trainer"]
    planted = {"prolong.training.sft_trainer": "from prolong.training.trainer import _PreemptionCallback, CPTTrainer\n",
               "prolong.data.cli": "from prolong.data.hub import _private\n"}  # outside the rule's scope
    assert private_imports(planted) == ["prolong.training.sft_trainer imports prolong.training.trainer._PreemptionCallback"]


def mixin_overlaps(sources: dict[str, str]) -> list[str]:
    """Methods that two mixins of one class both override: what runs would depend on the order of the bases."""
    import ast

    classes = {}  # class name -> (methods it defines, names of its bases)
    for source in sources.values():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                methods = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
                classes[node.name] = (methods, [getattr(b, "id", getattr(b, "attr", "")) for b in node.bases])
    found = []
    for name, (_, bases) in sorted(classes.items()):
        mixins = [b for b in bases if b.endswith("Mixin") and b in classes]
        for i, first in enumerate(mixins):
            for second in mixins[i + 1:]:
                found += [f"{name}: {first} and {second} both override {method}"
                          for method in sorted(classes[first][0] & classes[second][0])]
    return found


def test_one_mixin_owns_each_overridden_trainer_method():
    assert not mixin_overlaps(_sources()), mixin_overlaps(_sources())
    planted = {"m": "class AMixin:\n    def log(self): pass\n    def save(self): pass\n"
                    "class BMixin:\n    def log(self): pass\n"
                    "class T(AMixin, BMixin, Trainer):\n    def save(self): pass\n"}
    assert mixin_overlaps(planted) == ["T: AMixin and BMixin both override log"]
