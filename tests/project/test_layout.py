"""The layout holds: no import cycle (function-local imports counted), short functions, and option declarations
that drive both the command line and the validation. The layers themselves are import-linter contracts
(setup.cfg), run by `make lint`."""

import ast
import dataclasses
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.support import ROOT

PACKAGES = ("featcache", "heads")
MAX_FUNCTION_LINES = 50


def modules() -> dict[str, Path]:
    """{dotted name: file} of every module of featcache and heads."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(name: str, path: Path, known: dict) -> set[str]:
    """The project's modules `name` imports anywhere in its file (inside functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_counting_function_local_imports():
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    assert graph["featcache.cache.read"] >= {"featcache.cache.format", "featcache.cache.files"}   # the walk works
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_hidden_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_function_over_50_lines():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []


def test_help_imports_no_tensorflow():
    import subprocess
    import sys

    code = ("import sys; from click.testing import CliRunner; from featcache.cli import main; "
            "[CliRunner().invoke(main, [c, '--help']) for c in ('extract', 'train-head', 'train-baseline', 'curve', 'search')]; "
            "print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["False", "False"]


# --------------------------------------------------------------------------- one declaration per option

def _bad_values(f) -> list:
    """Values its declaration refuses: outside its choices or bounds, or of the wrong kind."""
    meta = f.metadata
    if meta["choices"]:
        return ["no-such-choice"]
    bad = []
    if meta["low"] is not None:
        bad.append(meta["low"] - 1 if meta["kind"] == "int" else meta["low"] - 0.5)
        if meta["low_open"]:
            bad.append(meta["low"])
    if meta["high"] is not None:
        bad.append(meta["high"] + (1 if meta["kind"] == "int" else 0.5))
        if meta["high_open"]:
            bad.append(meta["high"])
    if meta["kind"] == "units":
        bad += ["4x", "400,0"]
    return bad


def _option_sets():
    from featcache.extract.spec import ExtractSpec
    from featcache.options import declared
    from heads.config import TrainConfig

    return [(cls, f) for cls in (ExtractSpec, TrainConfig) for f in declared(cls) if _bad_values(f)]


@pytest.mark.parametrize("cls, field", _option_sets(), ids=lambda x: getattr(x, "name", getattr(x, "__name__", "")))
def test_each_constrained_option_is_refused_in_one_line_naming_it(cls, field):
    from featcache.errors import BadInputError
    from featcache.options import label

    base = {"weights": "random"} if cls.__name__ == "ExtractSpec" else {}
    for value in _bad_values(field):
        with pytest.raises(BadInputError) as e:
            cls(**{**base, field.name: value})
        assert label(field) in str(e.value) and "\n" not in str(e.value), (field.name, value, str(e.value))


def test_the_declarations_are_the_command_lines_options_and_defaults():
    """Every declared option a command shows is in its --help with the declared default, and a bad value of a
    bounded one exits 2 naming the option before any work."""
    from featcache.cli import main
    from featcache.extract.spec import options as spec_options
    from featcache.options import flag_name
    from heads.config import HEAD, options

    helps = CliRunner().invoke(main, ["train-head", "--help"], terminal_width=400).output
    for f in [x for x in spec_options() if x.metadata.get("cli", True) is True] + options(HEAD):
        flag = f.metadata["flag"] if isinstance(f.metadata.get("flag"), str) else flag_name(f)
        assert flag in helps, flag
        if f.default not in (None, True, False) and not isinstance(f.default, tuple):
            line = next(li for li in helps.splitlines() if li.strip().startswith(flag))
            assert f"[default: {f.default}]" in helps.split(line, 1)[1].split("\n  --")[0] or \
                f"default: {f.default}" in line, flag
    for f in options(HEAD):
        for value in _bad_values(f)[:1]:
            r = CliRunner().invoke(main, ["train-head", flag_name(f), str(value), "--data", "/nonexistent"])
            assert r.exit_code == 2 and flag_name(f) in r.output, (f.name, r.output)


def test_train_config_fields_all_have_declarations():
    from heads.config import TrainConfig

    assert all("kind" in f.metadata for f in dataclasses.fields(TrainConfig))


def _command_option_sets() -> list:
    """(command, option set) of every command whose options are declared in one dataclass, shown whole."""
    from heads.curve import CurveConfig
    from heads.export import ExportConfig
    from heads.mistakes import InspectConfig
    from heads.predict import PredictConfig
    from heads.reports import RunsTable
    from heads.search import SearchConfig

    return [("search", SearchConfig), ("curve", CurveConfig), ("predict", PredictConfig), ("export", ExportConfig),
            ("inspect", InspectConfig), ("runs", RunsTable)]


@pytest.mark.parametrize("command, cls", _command_option_sets(), ids=lambda x: getattr(x, "__name__", x))
def test_each_commands_options_are_built_from_its_declaration(command, cls):
    """The click option of each declared field carries the declaration's help and default (so neither is written
    twice), and a value the declaration refuses is refused in one line naming the option."""
    from featcache.cli import main
    from featcache.errors import BadInputError
    from featcache.options import declared, label

    params = {p.name: p for p in main.commands[command].params}
    for f in declared(cls):
        assert f.name in params, (command, f.name)
        assert params[f.name].help == f.metadata["help"], (command, f.name)
        if not f.metadata.get("flag"):
            default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
            assert params[f.name].default == default, (command, f.name)
        for value in _bad_values(f)[:1]:
            with pytest.raises(BadInputError) as e:
                cls(**{f.name: value})
            assert label(f) in str(e.value) and "\n" not in str(e.value), (f.name, value, str(e.value))


def test_runs_takes_one_format_and_says_so(tmp_path):
    from featcache.cli import main
    from heads.reports import runs_table

    r = CliRunner().invoke(main, ["runs", "--runs-dir", str(tmp_path), "--json", "--markdown"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "--json" in r.output, r.output
    assert runs_table(runs_dir=tmp_path) == "" and runs_table(runs_dir=tmp_path, json=True) == "[]"


#: Unit-test files named after what they test across modules, not after one module.
TOPICS = {"tests/featcache/sources/test_hostile_sources.py", "tests/heads/test_finetune.py", "tests/heads/test_refit.py",
          "tests/heads/test_small_data.py"}


def test_unit_tests_mirror_the_packages():
    """tests/featcache/<package>/test_<module>.py tests featcache/<package>/<module>.py (or the package itself), and
    likewise for heads, so that a module's tests are found by its name; cross-module topics are listed above."""
    stray = []
    for package in PACKAGES:
        for path in sorted((ROOT / "tests" / package).rglob("test_*.py")):
            rel = path.relative_to(ROOT / "tests")
            name = path.stem.removeprefix("test_")
            target = ROOT / rel.parent
            if not ((target / f"{name}.py").exists() or (target / name / "__init__.py").exists()
                    or target.name == name) and str(path.relative_to(ROOT)) not in TOPICS:
                stray.append(str(rel))
    assert stray == []
    assert not list((ROOT / "tests").glob("test_*.py")), "tests live in the folder of what they test"


def test_bench_scripts_share_one_helper_module():
    """Each bench script imports what it shares from bench/common.py alone (never from another benchmark), leaves
    sys.path to it, and uses featcache's public names only."""
    scripts = {p.stem for p in (ROOT / "bench").glob("*.py")}
    found = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        if path.name == "common.py":
            continue
        tree = ast.parse(path.read_text())
        found += [f"{path.name} imports {n.module}" for n in ast.walk(tree)
                  if isinstance(n, ast.ImportFrom) and n.module in scripts - {"common"}]
        found += [f"{path.name} edits sys.path" for n in ast.walk(tree)
                  if isinstance(n, ast.Attribute) and n.attr == "path" and getattr(n.value, "id", "") == "sys"]
        found += [f"{path.name}:{n.lineno} reaches into {ast.unparse(n)}" for n in ast.walk(tree)
                  if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
                  and getattr(n.value, "id", "") != "self"]
        found += [f"{path.name} imports {a.name} from {n.module}" for n in ast.walk(tree)
                  if isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] in PACKAGES
                  for a in n.names if a.name.startswith("_")]
    assert found == []
