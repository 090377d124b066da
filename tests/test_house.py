"""The house rules a newcomer relies on, checked on the source: `ls` shows the method (at most 14 top-level
modules, each named in README's Files table), every file reads in one sitting (<= 400 lines, no line over
110, no function over 60 lines but the training loop's ~90), no import circle, a README of <= 250 lines."""

import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py")))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "*", "*.py")))
DESIGN_CARD = ("model.py", "latent_head.py", "losses.py", "data.py", "train.py", "sample.py")
LONGEST_LOOP = {("train.py", "train"): 90}   # the one optimizer step, top to bottom (Run.train)


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_the_method_at_the_root_and_every_file_in_the_readme():
    assert set(DESIGN_CARD) <= set(TOP)
    assert len(TOP) <= 14, f"{len(TOP)} top-level modules: {TOP}"
    readme = read(os.path.join(ROOT, "README.md"))
    files = readme.split("\n## Files\n", 1)[1].split("\n## ", 1)[0]
    named = {cell.strip("` ") for row in files.splitlines()[2:] for cell in row.split("|")[1:2]}
    for name in TOP:
        assert name in named, f"README's Files table does not name {name}"
    for folder in sorted({os.path.relpath(p, ROOT).split(os.sep)[0] for p in SOURCES} - set(TOP)):
        assert f"`{folder}/" in files, f"README's Files table does not name {folder}/"
    assert len(readme.splitlines()) <= 250


def test_every_file_reads_in_one_sitting():
    for path in SOURCES:
        name, src = os.path.relpath(path, ROOT), read(path)
        lines = src.splitlines()
        assert len(lines) <= 400, f"{name}: {len(lines)} lines"
        wide = [i + 1 for i, line in enumerate(lines) if len(line) > 110]
        assert not wide, f"{name}: lines over 110 characters: {wide}"
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n, limit = node.end_lineno - node.lineno + 1, LONGEST_LOOP.get((name, node.name), 60)
                assert n <= limit, f"{name}: {node.name} has {n} lines (at most {limit})"


def top_level_imports(path):
    """The project's top-level modules that `path` imports at module level (not inside functions)."""
    names = set()
    for node in ast.parse(read(path)).body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return {n + ".py" for n in names} & set(TOP)


def test_no_import_circle():
    graph = {name: top_level_imports(os.path.join(ROOT, name)) for name in TOP}

    def reaches(start, goal, seen):
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph[start])
    circles = [name for name in TOP if reaches(name, name, {name})]
    assert not circles, f"modules on an import circle: {circles}"


def test_calls_name_their_arguments():
    """No call in a top-level module passes more than 5 positional arguments (autograd's Function.apply is
    exempt), and NamedTuples and dataclasses are built with keywords: a reader sees what each value is."""
    built_by_name = {"Batch", "Counts", "StepDraw", "StepPlan", "Supervision", "ObjectiveConfig", "Example"}
    for name in TOP:
        for node in ast.walk(ast.parse(read(os.path.join(ROOT, name)))):
            if not isinstance(node, ast.Call):
                continue
            func = ast.unparse(node.func)
            where = f"{name}:{node.lineno}: {func}"
            n = len(node.args)
            assert n <= 5 or func.endswith(".apply"), f"{where} takes {n} positional arguments"
            if func.split(".")[-1] in built_by_name:
                assert not node.args, f"{where} is built positionally"


def test_the_model_forward_is_about_the_model():
    """GPT.forward takes the model's inputs, (idx, targets, n_steps) and at most one more: training's
    estimators are composed from its parts where the objective lives (losses.Objective)."""
    tree = ast.parse(read(os.path.join(ROOT, "model.py")))
    gpt = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "GPT")
    forward = next(n for n in gpt.body if isinstance(n, ast.FunctionDef) and n.name == "forward")
    params = [a.arg for a in forward.args.args + forward.args.kwonlyargs][1:]
    assert len(params) <= 4 and params[:3] == ["idx", "targets", "n_steps"], params
