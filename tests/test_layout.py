"""The package's shape: no import cycle, dependencies pointing down, the benchmark outside, modules of one job,
Transformers internals in one place."""

import ast
import configparser
import pathlib
import re
import warnings

import pytest
import transformers
from packaging.specifiers import SpecifierSet

from hf_memsinks import transformers_internals

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_memsinks"
PRIVATE = re.compile(r"(?<!\w)(?:_model_mapping|_keys_to_ignore_on_load_unexpected|_experts_implementation|_apply_gate"
                     r"|_gradient_checkpointing_func|_set_gradient_checkpointing|_raise_exceptions_for\w+)\b|integrations\.moe")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    """Every hf_memsinks module ``path`` imports, at module level or inside functions."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            if base in modules:
                out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
    out.discard(name)
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(files)) for name, path in files.items()}


def test_no_import_cycle():
    graph, state, stack = _graph(), {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_cycle_check_sees_cycles(tmp_path, monkeypatch):
    """The check above would catch the cycle a local import hides."""
    (tmp_path / "hf_memsinks").mkdir()
    (tmp_path / "hf_memsinks" / "__init__.py").write_text("")
    (tmp_path / "hf_memsinks" / "a.py").write_text("from .b import x\n")
    (tmp_path / "hf_memsinks" / "b.py").write_text("def f():\n    from .a import y\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path / "hf_memsinks")
    try:
        test_no_import_cycle()
    except AssertionError as err:
        assert "hf_memsinks.a -> hf_memsinks.b -> hf_memsinks.a" in str(err)
    else:
        raise AssertionError("the cycle was not found")


# Each part of the package and its level: a module imports only modules of a lower level, or of its
# own part (package or module). Unlisted modules fail the test, so a new one must be placed here.
LEVELS = {
    "version": 0, "unwrap": 0, "transformers_internals": 0, "ids": 0,
    "config": 1,
    "layers": 2, "data": 2, "evaluation": 2,
    "mlp_discovery": 3,
    "checkpoints": 4, "sightings": 4,
    "publishing": 5,  # below the model, whose push_to_hub refuses through it; reads checkpoints' key names
    "model": 6,
    "export": 7,
    "integrations": 8,
    "global_patches": 9, "cli": 9, "__init__": 10,
}




def _part(module: str) -> str:
    """``hf_memsinks.model.routing`` -> ``model``; the package itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_has_a_level():
    missing = {_part(name) for name in _graph()} - set(LEVELS)
    assert not missing, f"give these parts of hf_memsinks a level in LEVELS: {sorted(missing)}"


def test_dependencies_point_down():
    """ids and layers import nothing above them, model no integration, integrations sit on top."""
    wrong = [f"{name} ({_part(name)}, level {LEVELS[_part(name)]}) imports {target} ({_part(target)}, level "
             f"{LEVELS[_part(target)]})" for name, targets in sorted(_graph().items()) for target in sorted(targets)
             if _part(target) != _part(name) and LEVELS[_part(target)] >= LEVELS[_part(name)]]
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_the_direction_check_sees_lazy_and_relative_imports():
    graph = _graph()
    assert "hf_memsinks.publishing.git_hook" in graph["hf_memsinks.cli.main"]  # imported inside a function
    assert "hf_memsinks.export" in graph["hf_memsinks.cli.main"]  # relative, two levels up
    assert "hf_memsinks.publishing.pushes" in graph["hf_memsinks.model.memsink_model"]
    assert "hf_memsinks.global_patches" in graph["hf_memsinks"]


def test_the_library_never_imports_the_benchmark():
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] == "benchmarks"]
    assert not found, found


def test_modules_live_in_pipeline_subpackages_and_stay_small():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "export.py", "global_patches.py", "transformers_internals.py",
                   "unwrap.py", "version.py"], top
    for path in PACKAGE.rglob("*.py"):
        lines = len(path.read_text().splitlines())
        assert lines <= 350, f"{path.relative_to(ROOT)} has {lines} lines"


def test_transformers_internals_are_touched_in_one_module():
    for path in PACKAGE.rglob("*.py"):
        if path.name != "transformers_internals.py":
            found = PRIVATE.findall(path.read_text())
            assert not found, f"{path.relative_to(ROOT)} touches Transformers internals {found}"


def test_installed_transformers_is_tested_and_in_the_declared_range():
    """The floor of setup.cfg is the oldest tested release; the installed one is in the tested range."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    requirement = next(line.strip() for line in config["options"]["install_requires"].splitlines()
                       if line.strip().startswith("transformers"))
    declared = SpecifierSet(requirement[len("transformers"):])
    assert transformers.__version__ in declared, (transformers.__version__, requirement)
    oldest, newest = transformers_internals.OLDEST_TESTED, transformers_internals.NEWEST_TESTED
    major, minor = map(int, oldest.split("."))
    assert f"{oldest}.0" in declared and f"{major}.{minor - 1}.99" not in declared, requirement
    assert f"{newest}.0" in declared and f"{newest}.99" in declared, requirement
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        transformers_internals.check_transformers_version()  # neither raises nor warns


def test_a_newer_minor_release_warns_and_an_older_one_is_refused():
    newest = transformers_internals.NEWEST_TESTED
    major, minor = map(int, newest.split("."))
    with pytest.warns(UserWarning, match=f"tested with transformers .* to {newest}, not {major}.{minor + 1}.0"):
        transformers_internals.check_transformers_version(f"{major}.{minor + 1}.0")
    with pytest.warns(UserWarning, match="not 6.0.0.dev0"):
        transformers_internals.check_transformers_version("6.0.0.dev0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        transformers_internals.check_transformers_version(f"{newest}.3")
    oldest = transformers_internals.OLDEST_TESTED
    major, minor = map(int, oldest.split("."))
    for older in (f"{major}.{minor - 1}.2", "4.57.6"):
        with pytest.raises(RuntimeError, match=f"transformers>={oldest}"):
            transformers_internals.check_transformers_version(older)


def test_the_readme_support_table_is_what_make_test_compat_installs():
    """Each row of README's "Supported versions": oldest and newest as pinned in the Makefile's
    COMPAT_oldest / COMPAT_newest (torch: TORCH_PIN), transformers' at OLDEST_TESTED / NEWEST_TESTED."""
    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    pins = {end: dict(re.findall(r"([\w-]+)==([\d.]+)", re.search(rf"^COMPAT_{end} := (.*)$", makefile, re.M)[1]))
            for end in ("oldest", "newest")}
    torch_pin = re.search(r"^TORCH_PIN := torch==([\d.]+)$", makefile, re.M)[1]
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("### Supported versions"):].split("\n\n")[1]
    rows = {cells[0]: cells[1:3] for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:])}
    assert rows.keys() == {"transformers", "huggingface_hub", "torch", "trl", "peft", "accelerate", "datasets"}
    for package, (oldest, newest) in rows.items():
        if package == "torch":
            assert oldest.split()[0] == newest.split()[0] == torch_pin
        else:
            assert (oldest, newest) == (pins["oldest"][package], pins["newest"][package]), package
    assert rows["transformers"][0].startswith(transformers_internals.OLDEST_TESTED + ".")
    assert rows["transformers"][1].startswith(transformers_internals.NEWEST_TESTED + ".")
