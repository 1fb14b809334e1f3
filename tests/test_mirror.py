"""tests/ mirrors the package (tests/README.md): the tests of hf_memsinks/<part>/ live in tests/<part>/, those
of benchmarks/ in tests/benchmarks/, and every test file a document or the Makefile names exists, so that a
reader finds a module's tests by its name and a moved test cannot leave a stale reference behind."""

import collections
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
# where test files are named: docs, the Makefile, configs' comments, docstrings
NAMING = ["*.md", "Makefile", "docs/**/*.md", "configs/**/*.yaml", "benchmarks/**/*.py", "hf_memsinks/**/*.py",
          "tests/**/*.py", "tests/**/*.md", "examples/**/*.py"]
# a test file, from the repository root (tests/...) or from tests/ (as docs/guarantees.md names them),
# and the test after "::" when one is named
REFERENCE = re.compile(r"(?<![\w/.])(?:tests/)?((?:\w+/)*test_\w+\.py)(?:::(\w+))?")


def _test_files() -> list[pathlib.Path]:
    return sorted(p for p in TESTS.rglob("test_*.py") if "__pycache__" not in p.parts)


def test_every_test_folder_mirrors_a_part_of_the_package_or_the_benchmarks():
    wrong = []
    for path in _test_files():
        folder = path.parent.relative_to(TESTS)
        mirrored = ROOT / folder if folder.parts[:1] == ("benchmarks",) else ROOT / "hf_memsinks" / folder
        if folder.parts and not (mirrored / "__init__.py").is_file():
            wrong.append(str(path.relative_to(ROOT)))
    assert not wrong, f"test files in folders that mirror no package of hf_memsinks/ or benchmarks/: {wrong}"


def test_helpers_sit_at_the_top_where_pythonpath_finds_them():
    nested = [str(p.relative_to(ROOT)) for p in TESTS.rglob("*.py")
              if p.parent != TESTS and not p.name.startswith("test_") and "__pycache__" not in p.parts]
    assert not nested, f"helpers belong in tests/ itself (setup.cfg: pythonpath = tests): {nested}"


def test_test_files_have_unique_names_and_no_package_files():
    """pytest's default import mode imports a test file by its bare name from its own folder: folders
    without __init__.py, so two files of one name would collide."""
    names = collections.Counter(p.name for p in _test_files())
    assert not [n for n, count in names.items() if count > 1], names.most_common(3)
    assert not list(TESTS.rglob("__init__.py"))


def test_every_named_test_file_and_test_exists():
    missing = []
    for pattern in NAMING:
        for path in ROOT.glob(pattern):
            if path.is_file():
                for match in REFERENCE.finditer(path.read_text()):
                    target = TESTS / match[1]
                    if not target.is_file() or (match[2] and f"def {match[2]}(" not in target.read_text()):
                        missing.append(f"{path.relative_to(ROOT)}: {match[0]}")
    assert not missing, "references to tests that do not exist:\n" + "\n".join(missing)
