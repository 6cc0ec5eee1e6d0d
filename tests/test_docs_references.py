"""What README.md and the docs name exists: every repository file (`prolong/run_cpt.py`,
`tests/test_sft.py`), every `path.py:name` and every dotted `prolong.x.name` / `evaluation.x.name`.
Files must exist; a named function, class or constant must be defined (or imported) at the top of
that file or module (`Class.method` inside the class). Read from the source with `ast`, nothing is
imported, so this runs in a second."""

from __future__ import annotations

import ast
import glob
import itertools
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))),
             "tests/fixtures/helmet/README.md", "tests/fixtures/mds/README.md", "tests/fixtures/ruler/README.md"]
# top-level folders whose files the docs name by path
FOLDERS = ("prolong", "evaluation", "benchmarks", "tests", "scripts", "recipes", "docs", "accelerate_configs")
PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./*{},-]*\.(?:py|yaml|yml|md|json|png|txt|sh)(?:\.gz)?)" % "|".join(FOLDERS))
# `path.py:name` or `path.py: name`, inside backticks only (in prose a colon after a path starts a sentence)
PATH_NAME = re.compile(r"^(\S+\.py):\s?([A-Za-z_][\w.]*)$")
MODULE = re.compile(r"(?<![\w./-])((?:prolong|evaluation)(?:\.[A-Za-z_]\w*)+)")
BARE_FILE = re.compile(r"(?<![\w./<>{}-])([A-Za-z_]\w*\.py)\b")
# file names of other projects that the docs discuss (HELMET's code, which is not in this repository)
OTHER_PROJECTS = {"eval.py", "eval_alce.py", "data.py", "model_utils.py", "collect_results.py", "arguments.py",
                  "utils.py"}
OTHER_PROJECT_PATH = re.compile(r"HELMET(?:'s)?[\s`(]*$")  # "HELMET `scripts/eval_gpt4_summ.py`": HELMET's file
MISSING_ON_PURPOSE = {"recipes/nope.yaml"}  # docs/bad-inputs.md: the case of a recipe file that does not exist


def _expand(pattern: str) -> list[str]:
    """`a/{b,c}.py` -> [a/b.py, a/c.py] (one brace group is all the docs use)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    return [pattern[:match.start()] + choice + pattern[match.end():] for choice in match.group(1).split(",")]


def _module_file(dotted: str) -> str | None:
    base = os.path.join(ROOT, *dotted.split("."))
    for candidate in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(candidate):
            return candidate
    return None


def _top_level_names(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """Names a module (or class) body defines: def, class, assignment, import; also inside top-level
    if/try blocks (optional imports)."""
    names: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            names.update({t.id: node for target in node.targets for t in ast.walk(target) if isinstance(t, ast.Name)})
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update({(alias.asname or alias.name).split(".")[0]: node for alias in node.names})
        elif isinstance(node, (ast.If, ast.Try)):
            blocks = [node.body, node.orelse, *([h.body for h in node.handlers] if isinstance(node, ast.Try) else [])]
            for block in blocks:
                names.update(_top_level_names(block))
    return names


def _defines(path: str, dotted_name: str) -> bool:
    """Whether `path` defines `dotted_name` (`name` or `Class.attribute`)."""
    with open(path, encoding="utf-8") as f:
        body = ast.parse(f.read()).body
    for part in dotted_name.split("."):
        node = _top_level_names(body).get(part)
        if node is None:
            return False
        if not isinstance(node, ast.ClassDef):
            return True  # an attribute of a function's result or an imported object: the name is what is checked
        body = node.body
    return True


def check_module_name(dotted: str) -> str | None:
    """`prolong.a.b.name`: the longest prefix that is a module, then the rest defined in it."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        path = _module_file(".".join(parts[:cut]))
        if path is None:
            continue
        rest = ".".join(parts[cut:])
        if not rest:
            return None
        if _defines(path, rest):
            return None
        subpackage = os.path.join(os.path.dirname(path), parts[cut]) if path.endswith("__init__.py") else None
        return (f"{dotted}: {os.path.relpath(path, ROOT)} defines no {rest}"
                + (f" (and {os.path.relpath(subpackage, ROOT)}.py does not exist)" if subpackage else ""))
    return f"{dotted}: no such module"


def check_path(path: str, name: str | None = None) -> str | None:
    if "<" in path:
        return None  # a placeholder (`tasks/<category>.py`)
    matches = [m for pattern in _expand(path) for m in glob.glob(os.path.join(ROOT, pattern))]
    if not matches:
        return f"{path}: no such file"
    if name and not _defines(matches[0], name):
        return f"{path}:{name}: {path} defines no {name}"
    return None


def _repository_files() -> set[str]:
    skip = {".git", ".venv", "node_modules", "__pycache__", "demo_data", "outputs"}
    names = set()
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".venv")]
        names.update(files)
    return names


def references(text: str) -> set[tuple[str, ...]]:
    """('path', p) / ('path', p, name) / ('module', dotted) / ('file', basename) named in Markdown text."""
    found: set[tuple[str, ...]] = set()
    for span in re.findall(r"`([^`\n]+)`", text):
        match = PATH_NAME.match(span.strip())
        if match and match.group(1).split("/")[0] in FOLDERS:
            found.add(("path", match.group(1), match.group(2)))
    found |= {("path", m.group(1)) for m in PATH.finditer(text)
              if m.group(1) not in MISSING_ON_PURPOSE and not OTHER_PROJECT_PATH.search(text[max(0, m.start() - 12):m.start()])}
    found |= {("module", m) for m in MODULE.findall(text)}
    found |= {("file", f) for f in BARE_FILE.findall(text) if f not in OTHER_PROJECTS}
    return found


def problems(text: str) -> list[str]:
    files = None
    out = []
    for ref in sorted(references(text)):
        kind, value = ref[0], ref[1]
        if kind == "path":
            problem = check_path(value, ref[2] if len(ref) > 2 else None)
        elif kind == "module":
            problem = check_module_name(value)
        else:
            files = files if files is not None else _repository_files()
            problem = None if value in files else f"{value}: no file of that name in the repository"
        if problem:
            out.append(problem)
    return out


@pytest.mark.parametrize("document", DOCUMENTS)
def test_named_files_and_functions_exist(document):
    with open(os.path.join(ROOT, document), encoding="utf-8") as f:
        text = f.read()
    assert references(text), f"{document} names no file or module (the reader is broken?)"
    found = problems(text)
    assert not found, f"{document} names what does not exist:\n" + "\n".join(found)


def test_the_check_finds_wrong_references():
    """The reader and the checks on names that exist and on names that do not."""
    good = ("`prolong/run_cpt.py`, `evaluation/config.py:EvalSettings`, `evaluation.runner.evaluate`, "
            "`prolong.training.memory.activation_offload(True)`, `tests/test_parallel*.py`, `recipes/tiny/{cpt,sft}.yaml`, "
            "`prolong.demo.__main__`, `prolong.config.CPTConfig.activation_offload`, `cite.py`, HELMET's eval_alce.py, "
            "HELMET `scripts/eval_gpt4_summ.py`")
    assert problems(good) == []
    assert len(references(good)) == 10
    bad = ("`prolong/nope.py`, `evaluation/config.py:NoSuchSettings`, prolong.parallel.activation_offload, "
           "`prolong.nosuch.module`, `tests/test_nothing*.py`, `no_such_module.py`, `prolong.config.CPTConfig.nope`")
    found = problems(bad)
    assert len(found) == 7, found
    assert any("prolong/parallel/__init__.py defines no activation_offload" in p for p in found), found
    assert [kind for kind, *_ in sorted(references(bad))] == [
        "file", "module", "module", "module", "path", "path", "path", "path"]


def test_every_document_is_read():
    assert {"README.md", "docs/evaluation.md", "docs/scale-out.md"} <= set(DOCUMENTS)
    assert all(os.path.isfile(os.path.join(ROOT, d)) for d in DOCUMENTS)
    assert len(list(itertools.chain.from_iterable(references(open(os.path.join(ROOT, d)).read())
                                                  for d in DOCUMENTS))) > 100


def test_the_evaluation_task_table_lists_every_task():
    """docs/evaluation.md's task table names each registered task once, in its category's row."""
    from evaluation.tasks import CATEGORIES, TASKS

    with open(os.path.join(ROOT, "docs", "evaluation.md"), encoding="utf-8") as f:
        section = f.read().split("## Tasks", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    table = {category.strip(): {t.strip() for t in tasks.split(",")} for category, tasks in rows[1:]}
    listed = [task for tasks in table.values() for task in tasks]
    assert sorted(listed) == sorted(TASKS), "docs/evaluation.md's task table and evaluation/tasks differ"
    for name, task in TASKS.items():
        assert name in table[CATEGORIES[task.category]], (name, task.category)
