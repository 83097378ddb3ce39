"""dvc.yaml cannot drift from the code: each stage's deps cover every segflow module its command can import, its
params cover every params.yaml key its command reads, and params.yaml holds the schema's defaults."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from segflow.config import Params

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SRC = PROJECT_ROOT / "src"
CLI = SRC / "segflow" / "cli.py"
# Where runs are logged is not an input of what a stage computes (and the tests move it to a temporary store).
NOT_INPUTS = {"mlflow"}


# --- segflow's import graph, imports inside functions included ---------------------------------------------

@cache
def module_files() -> dict[str, Path]:
    files = {}
    for path in (SRC / "segflow").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported_modules(nodes: list[ast.AST], package: str) -> set[str]:
    """The segflow modules the import statements anywhere under ``nodes`` name (``from segflow import models``
    names the subpackage; ``from segflow.x import f`` the module x)."""
    found = set()
    for node in (n for top in nodes for n in ast.walk(top)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])])
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in found if name in module_files()}


@cache
def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in module_files().items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = imported_modules([ast.parse(path.read_text())], package) - {name}
    return graph


def closure(start: set[str], packages: bool = True) -> set[str]:
    """``start`` and everything it can import; with ``packages``, also each package a submodule of which is
    imported (its __init__ runs)."""
    seen, todo = set(), list(start)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)] if packages else []
        todo += [*import_graph()[name], *(p for p in parents if p in module_files())]
    return seen


def test_no_import_cycle_among_segflow_modules():
    graph = import_graph()
    cycles = [name for name in graph if any(name in closure({dep}, packages=False) for dep in graph[name])]
    assert not cycles, f"modules on an import cycle (imports inside functions count): {sorted(cycles)}"


# The layers, top to bottom: a module imports its own layer's modules and lower layers', never a higher one.
LAYERS = ["segflow.cli", "segflow.stages", "segflow.orchestration", "segflow.training", "segflow.registry",
          "segflow.inference", "segflow.data", "segflow.config", "segflow.models", "segflow.fsutil", "segflow.errors",
          "segflow"]


def layer(module: str) -> int:
    return next(i for i, top in enumerate(LAYERS) if module == top or module.startswith(top + "."))


def test_no_import_runs_up_the_layers():
    upward = sorted((name, dep) for name, deps in import_graph().items() for dep in deps if layer(dep) < layer(name))
    assert not upward, f"imports from a lower layer up to a higher one: {upward}"


def test_stage_modules_are_not_libraries_of_each_other():
    # Each DVC stage is named after its module in segflow.stages (evaluate_teacher: evaluate's), and that folder
    # holds nothing else but `predict`; what two stages share lives in a lower layer (data, inference, training...).
    # The teacher stage is two trainings: it calls train's.
    stage_modules = {f"segflow.stages.{name.split('@')[0].removesuffix('_teacher')}" for name in dvc_stages()}
    in_stages = {name for name in module_files() if name.startswith("segflow.stages.")}
    assert in_stages == stage_modules | {"segflow.stages.predict"}, in_stages ^ (stage_modules | {"segflow.stages.predict"})
    allowed = {("segflow.stages.teacher", "segflow.stages.train")}
    offending = sorted((name, dep) for name, deps in import_graph().items() for dep in deps
                       if dep in stage_modules and name != "segflow.cli" and (name, dep) not in allowed)
    assert not offending, f"modules importing a stage's module: {offending}"


# --- the stage commands, as the CLI defines them -------------------------------------------------------------

@cache
def cli_tree() -> ast.Module:
    return ast.parse(CLI.read_text())


def cli_functions() -> dict[str, ast.FunctionDef]:
    return {node.name: node for node in cli_tree().body if isinstance(node, ast.FunctionDef)}


def command_function(words: list[str]) -> ast.FunctionDef:
    """The function behind ``segflow WORDS...`` (typer: the function name with - for _, or the name given)."""
    for function in cli_functions().values():
        for decorator in function.decorator_list:
            if not (isinstance(decorator, ast.Call) and getattr(decorator.func, "attr", None) == "command"):
                continue
            app = decorator.func.value.id
            name = decorator.args[0].value if decorator.args else function.name.replace("_", "-")
            path = [name] if app == "app" else [app.removesuffix("_app"), name]
            if words[: len(path)] == path:
                return function
    raise AssertionError(f"no CLI command for segflow {' '.join(words)}")


def with_helpers(function: ast.FunctionDef) -> list[ast.FunctionDef]:
    """``function`` and the cli.py helpers it calls, transitively."""
    functions, todo = [], [function]
    while todo:
        current = todo.pop()
        if current in functions:
            continue
        functions.append(current)
        called = {n.func.id for n in ast.walk(current) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        todo += [cli_functions()[name] for name in called if name in cli_functions()]
    return functions


def section_key(chain: list[str]) -> tuple[str, ...]:
    """The params.yaml key an attribute chain on ``Params`` reads (field aliases as in the file; a method ends it)."""
    key, model = [], Params
    for attribute in chain:
        field = model.model_fields.get(attribute) if isinstance(model, type) else None
        if field is None:
            break
        key.append(field.alias or attribute)
        model = field.annotation
    return tuple(key)


def params_reads(functions: list[ast.FunctionDef]) -> tuple[set[tuple[str, ...]], list[str]]:
    """The params.yaml keys read through ``params = load_params(...)`` (or ``load_params(...).x``), and every use
    that hands the whole ``Params`` on (which would hide what is read)."""
    reads, whole = set(), []
    for function in functions:
        parents = {child: node for node in ast.walk(function) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(function):
            is_params = (isinstance(node, ast.Name) and node.id == "params" and isinstance(node.ctx, ast.Load)) or (
                isinstance(node, ast.Call) and getattr(node.func, "id", None) == "load_params")
            parent = parents.get(node)
            if not is_params or isinstance(parent, ast.Assign) or (  # the load, or a cli.py helper (read too)
                    isinstance(parent, ast.Call) and getattr(parent.func, "id", None) in cli_functions()):
                continue
            chain, current = [], node
            while isinstance(parents.get(current), ast.Attribute):
                current = parents[current]
                chain.append(current.attr)
            key = section_key(chain)
            if key:
                reads.add(key)
            else:
                whole.append(f"{function.name}:{node.lineno}")
    return reads, whole


# --- dvc.yaml, resolved by DVC itself ------------------------------------------------------------------------

@cache
def dvc_stages() -> dict[str, dict]:
    """Each stage (matrix items expanded): its command, dependency paths and declared params keys."""
    from dvc.repo import Repo

    stages = {}
    with Repo(str(PROJECT_ROOT), uninitialized=True) as repo:
        for stage in repo.index.stages:
            params, paths = set(), set()
            for dep in stage.deps:
                if type(dep).__name__ == "ParamsDependency":
                    params |= {tuple(key.split(".")) for key in (dep.params or [])}
                else:
                    paths.add(Path(dep.def_path))
            stages[stage.addressing] = {"cmd": stage.cmd, "params": params, "deps": paths,
                                        "outs": {Path(out.def_path) for out in stage.outs}}
    return stages


def command_words(cmd: str) -> list[str]:
    words = cmd.split()
    assert words[0] == "segflow", cmd
    return [w for w in words[1:3] if not w.startswith(("-", "$")) and "/" not in w]


def covered(path: Path, deps: set[Path]) -> bool:
    return any(path == dep or dep in path.parents for dep in deps)


STAGES = sorted(dvc_stages())


@pytest.mark.parametrize("stage", STAGES)
def test_stage_deps_cover_every_module_its_command_can_import(stage):
    spec = dvc_stages()[stage]
    function = command_function(command_words(spec["cmd"]))
    # cli.py itself (its top-level imports, and the command with the helpers it calls), then what they import.
    top_level = [node for node in cli_tree().body if isinstance(node, ast.Import | ast.ImportFrom)]
    used = closure(imported_modules([*top_level, *with_helpers(function)], "segflow"))
    files = {module_files()[name].relative_to(PROJECT_ROOT) for name in used} | {CLI.relative_to(PROJECT_ROOT)}
    if "segflow.models.zoo" in used:  # it imports the architecture families by name: all of them
        files.add(Path("src/segflow/models"))
    missing = sorted(str(f) for f in files if not covered(f, spec["deps"]))
    assert not missing, f"dvc.yaml stage {stage} runs code it does not depend on: add {missing} to its deps"


@pytest.mark.parametrize("stage", STAGES)
def test_stage_params_cover_every_key_its_command_reads(stage):
    spec = dvc_stages()[stage]
    reads, whole = params_reads(with_helpers(command_function(command_words(spec["cmd"]))))
    assert not whole, f"{stage}: the command hands the whole Params on ({whole}); pass the sections it reads"
    declared = spec["params"]
    missing = sorted(".".join(key) for key in reads
                     if key[0] not in NOT_INPUTS and not any(key[: len(d)] == d for d in declared))
    assert not missing, f"dvc.yaml stage {stage} reads params it does not declare: add {missing} to its params"


def test_the_checks_see_a_missing_dependency_and_a_hidden_read():
    """The two checks above on what they must catch: a module only imported inside a function, and a key only
    read through a chain."""
    function = command_function(["train"])
    modules = closure(imported_modules(with_helpers(function), "segflow"))
    assert {"segflow.stages.train", "segflow.inference.metrics", "segflow.training.checkpoint"} <= modules
    reads, whole = params_reads(with_helpers(command_function(["evaluate"])))
    assert ("train", "device") in reads and ("evaluate",) in reads and not whole
    assert section_key(["validate_", "min_train"]) == ("validate", "min_train")
    assert section_key(["train", "model_copy"]) == ("train",)


# --- params.yaml and the schema: one source of defaults -------------------------------------------------------

def leaves(model: type[BaseModel] | BaseModel, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    out = {}
    for name, field in type(model).model_fields.items() if isinstance(model, BaseModel) else model.model_fields.items():
        key = (*prefix, field.alias or name)
        value = getattr(model, name) if isinstance(model, BaseModel) else None
        if isinstance(value, BaseModel):
            out |= leaves(value, key)
        else:
            out[key] = value
    return out


def test_params_yaml_holds_the_schema_defaults_and_every_key():
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    defaults = Params().model_dump(mode="json", by_alias=True)
    in_file = Params.model_validate(raw).model_dump(mode="json", by_alias=True)
    # Builder options per architecture are examples, not defaults: the schema has none.
    in_file.pop("models"), defaults.pop("models")
    differing = {}

    def compare(a, b, key=()):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in a.keys() | b.keys():
                compare(a.get(k), b.get(k), (*key, k))
        elif a != b:
            differing[".".join(map(str, key))] = (a, b)

    compare(defaults, in_file)
    assert not differing, f"schema default vs params.yaml: {differing}"
    missing = []

    def walk(model: type[BaseModel], data: dict, key=()):
        for name, field in model.model_fields.items():
            k = field.alias or name
            if k == "models":
                continue
            if k not in (data or {}):
                missing.append(".".join((*key, k)))
            elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(field.annotation, data[k], (*key, k))

    walk(Params, raw)
    assert not missing, f"keys of the schema absent from params.yaml: {missing}"


def test_every_params_yaml_key_has_a_comment():
    lines = (PROJECT_ROOT / "params.yaml").read_text().splitlines()
    bare = [line.strip() for i, line in enumerate(lines)
            if ":" in line and not line.lstrip().startswith(("#", "-")) and "#" not in line
            and not (i + 1 < len(lines) and lines[i + 1].strip().startswith("#"))
            and not (i > 0 and lines[i - 1].strip().startswith("#"))]
    assert not bare, f"params.yaml keys without a one-line comment: {bare}"


# --- the stale cases rerun -------------------------------------------------------------------------------------

def placeholder(path: Path) -> None:
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix:
        path.write_text("{}")
    else:
        path.mkdir()
        (path / "placeholder").write_text("")


@pytest.fixture
def locked_project(tmp_path) -> Path:
    """A copy of the project whose dvc.lock records every stage as run (outputs and data are placeholders)."""
    project = tmp_path / "project"
    shutil.copytree(PROJECT_ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(PROJECT_ROOT / ".dvc", project / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(PROJECT_ROOT / name, project / name)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    for spec in dvc_stages().values():
        for path in (*spec["deps"], *spec["outs"]):
            placeholder(project / path)
    run_dvc(project, "commit", "--force", "--quiet")
    assert run_dvc(project, "status", "--json") == {}
    return project


def run_dvc(project: Path, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout) if "--json" in args else {}


def test_a_fix_in_a_module_a_stage_imports_reruns_it(locked_project):
    # segflow.inference.metrics decides the best epoch: every training, and everything after it, is stale when it changes.
    metrics = locked_project / "src" / "segflow" / "inference" / "metrics.py"
    metrics.write_text(metrics.read_text() + "\n# a fix\n")
    stale = run_dvc(locked_project, "status", "--json")
    trainings = {f"train@{arch}" for arch in Params.model_validate(
        yaml.safe_load((locked_project / "params.yaml").read_text())).train.archs}
    assert trainings | {"teacher", "evaluate_teacher", "register"} <= set(stale)
    assert {"synth", "ingest", "split"}.isdisjoint(stale)  # and nothing that does not import it


def test_a_params_key_only_training_reads_reruns_training(locked_project):
    # With teacher.rounds 0 the pseudo-labels can come out byte-identical: the key itself must rerun training.
    params_file = locked_project / "params.yaml"
    params_file.write_text(params_file.read_text().replace("reliable_fraction: 1.0", "reliable_fraction: 0.5"))
    stale = run_dvc(locked_project, "status", "--json")
    assert all(f"train@{arch}" in stale for arch in ("unet", "deeplabv3plus", "pspnet"))
    assert "teacher" not in stale
