"""The manual: the README is a front page, docs/ holds the rest, mkdocs builds it without a warning, and the
layout page names every module and recipe. Fast: no model is loaded."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO

DOCS = REPO / "docs"
PACKAGE = REPO / "bitnet_convert"
README = REPO / "README.md"
README_MAX_LINES = 250


def _fenced_blocks(text: str, language: str | None = None) -> list[list[str]]:
    """The lines of each fenced code block in ``text`` (only the ```language blocks when given)."""
    blocks: list[list[str]] = []
    current: list[str] | None = None
    keep = False
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current, keep = [], language is None or line[3:].strip() == language
            else:
                if keep:
                    blocks.append(current)
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def _layout_entries() -> dict[str, set[str]]:
    """The entries of docs/layout.md's code blocks: the first word of each line at indentation 0 (a path from the
    repository root, under the key "") or 2 (a path inside the last unindented directory, under that directory)."""
    entries: dict[str, set[str]] = {"": set()}
    directory = ""
    for block in _fenced_blocks((DOCS / "layout.md").read_text(encoding="utf-8")):
        for line in block:
            match = re.match(r"( {2})?(\S+)", line)
            if match is None:
                continue  # a continuation line (deeper indentation) or an empty one
            if match.group(1) is None:
                directory = match.group(2)
                entries[""].add(directory)
                entries.setdefault(directory, set())
            else:
                entries.setdefault(directory, set()).add(match.group(2))
    return entries


def _package_modules() -> set[str]:
    """Every module of the package as a path relative to bitnet_convert/ (``quant/kv.py``), ``__init__.py`` files
    left out, and every subpackage directory (``quant/``)."""
    modules = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    modules |= {p.parent.relative_to(PACKAGE).as_posix() + "/" for p in PACKAGE.rglob("__init__.py")
                if p.parent != PACKAGE}
    return {m for m in modules if "__pycache__" not in m}


def test_layout_lists_every_module_and_recipe():
    entries = _layout_entries()
    modules = _package_modules()
    recipes = {p.name for p in (REPO / "recipes").glob("*.yaml")}
    assert modules and recipes
    missing_modules = sorted(modules - entries.get("bitnet_convert/", set()))
    missing_recipes = sorted(recipes - entries.get("recipes/", set()))
    assert not missing_modules and not missing_recipes, (
        "docs/layout.md does not list (one line each, indented two spaces under `bitnet_convert/` or `recipes/`): "
        + ", ".join([f"bitnet_convert/{m}" for m in missing_modules] + [f"recipes/{r}" for r in missing_recipes]))


def test_layout_lists_nothing_that_does_not_exist():
    stale = sorted(f"{directory}{name}" for directory, names in _layout_entries().items() for name in names
                   if not (REPO / directory / name).exists())
    assert not stale, f"docs/layout.md lists paths that do not exist: {', '.join(stale)}"


# Repository paths a page names: bitnet_convert/…, tests/…, eval/…, recipes/…, docs/…, .ci/… (placeholders such
# as recipes/<recipe>.yaml are skipped; globs must match something).
_REPO_PATH = re.compile(r"(?<![\w./~-])((?:bitnet_convert|tests|eval|recipes|docs|\.ci)/[\w./*<>-]*)")


@pytest.mark.parametrize("page", ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in DOCS.rglob("*.md"))])
def test_repository_paths_named_in_the_manual_exist(page):
    text = (REPO / page).read_text(encoding="utf-8")
    stale = set()
    for path in _REPO_PATH.findall(text):
        path = path.rstrip(".")
        if "<" in path or ">" in path:
            continue
        if not (any(REPO.glob(path.rstrip("/"))) if "*" in path else (REPO / path).exists()):
            stale.add(path)
    assert not stale, f"{page} names paths that do not exist: {', '.join(sorted(stale))}"


def _nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [page for item in nav for page in _nav_pages(item)]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in _nav_pages(value)]
    return []


def test_every_docs_page_is_in_the_nav():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    assert config["docs_dir"] == "docs"
    nav = [p for p in _nav_pages(config["nav"]) if not re.match(r"[a-z]+://", p)]
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert sorted(pages - set(nav)) == [], "pages missing from mkdocs.yml's nav"
    assert sorted(set(nav) - pages) == [], "nav entries without a page"
    assert len(nav) == len(set(nav)), "a page listed twice in the nav"


def test_readme_is_a_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; the manual belongs in docs/"


def _quick_start_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## Quick start\n(.*?)(?=^## )", text, re.M | re.S)
    assert match, "README.md has no '## Quick start' section"
    return [line.strip() for block in _fenced_blocks(match.group(1), "bash") for line in block if line.strip()]


def test_quick_start_is_what_ci_runs():
    commands = _quick_start_commands()
    assert len(commands) == 2, commands
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    for command in commands:
        assert command in ci, f"README quick-start command not run verbatim by .ci/run: {command}"
    assert "`.ci/run` runs exactly these two." in README.read_text(encoding="utf-8")


def test_mkdocs_build_is_strict_and_clean(tmp_path: Path):
    pytest.importorskip("mkdocs")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output
    assert (tmp_path / "site" / "index.html").is_file()


def test_the_tests_mirror_the_package():
    """``tests/<folder>/`` exists only for a subpackage ``bitnet_convert/<folder>/``, and each ``test_<name>.py`` in it
    tests the module ``<name>.py`` of that subpackage (``native/test_kernels.py``: the C++ kernels in ``csrc/``)."""
    stray = []
    for folder in sorted(p for p in (REPO / "tests").iterdir() if p.is_dir() and p.name != "__pycache__"):
        package = PACKAGE / folder.name
        if not (package / "__init__.py").is_file():
            stray.append(f"tests/{folder.name}/ (no bitnet_convert/{folder.name}/)")
            continue
        for test in sorted(folder.glob("test_*.py")):
            module = test.stem.removeprefix("test_")
            if not (package / f"{module}.py").is_file() and (folder.name, module) != ("native", "kernels"):
                stray.append(f"tests/{folder.name}/{test.name} (no bitnet_convert/{folder.name}/{module}.py)")
    assert not stray, stray
