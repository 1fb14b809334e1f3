"""The package's shape: no import cycle, modules of one job, Transformers internals in one place."""

import ast
import configparser
import pathlib
import re

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


def test_modules_live_in_pipeline_subpackages_and_stay_small():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "cli.py", "config.py", "transformers_internals.py", "version.py"], top
    for path in PACKAGE.rglob("*.py"):
        lines = len(path.read_text().splitlines())
        assert lines <= 350, f"{path.relative_to(ROOT)} has {lines} lines"


def test_transformers_internals_are_touched_in_one_module():
    for path in PACKAGE.rglob("*.py"):
        if path.name != "transformers_internals.py":
            found = PRIVATE.findall(path.read_text())
            assert not found, f"{path.relative_to(ROOT)} touches Transformers internals {found}"


def test_installed_transformers_is_tested_and_in_the_declared_range():
    """Fails loudly on a Transformers release nobody checked the internals against."""
    transformers_internals.check_transformers_version()
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    requirement = next(line.strip() for line in config["options"]["install_requires"].splitlines()
                       if line.strip().startswith("transformers"))
    declared = SpecifierSet(requirement[len("transformers"):])
    assert transformers.__version__ in declared, (transformers.__version__, requirement)
    for version in transformers_internals.TESTED_VERSIONS:
        assert f"{version}.0" in declared, f"tested {version} is outside setup.cfg's {requirement}"


def test_an_untested_release_is_refused():
    try:
        transformers_internals.check_transformers_version("99.1.0")
    except RuntimeError as err:
        assert "TESTED_VERSIONS" in str(err)
    else:
        raise AssertionError("an untested release passed")
