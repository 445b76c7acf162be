"""The repository documents itself: no tracked file points at anything outside it.

A clone is all a reader has. A mention of a sibling directory, a machine's
absolute path, a design note or a ticket number that lives elsewhere is a dead
end for them, so the tracked files are searched for such references.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIS_FILE = Path(__file__).resolve().relative_to(ROOT).as_posix()

# What points outside the repository, and why it is refused.
FORBIDDEN: dict[str, re.Pattern[str]] = {
    "a sibling directory of the clone": re.compile(r"\.\./shared\b"),
    "a machine's absolute path": re.compile(r"(?<![\w.])/(work|home|Users)/[\w.-]"),
    "a design document kept elsewhere": re.compile(r"\bcontract\.md\b", re.IGNORECASE),
    "a numbered part of a design document kept elsewhere": re.compile(
        r"\bcontract\s*(section|rule|§|:)", re.IGNORECASE
    ),
    "reference documents kept elsewhere": re.compile(
        r"\bseeds\b|\bseed's\b|\bthe seed\b", re.IGNORECASE
    ),
    "a ticket number": re.compile(r"\bissues?\s*#?\s*\d+|#\d+\s*\(issue\b", re.IGNORECASE),
}


def tracked_text_files() -> list[tuple[str, str]]:
    """(path, text) for every tracked file that is text (UTF-8 without NUL bytes)."""
    listing = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
    ).stdout.decode("utf-8")
    files = []
    for path in filter(None, listing.split("\0")):
        full = ROOT / path
        if path == THIS_FILE or not full.is_file():
            continue
        data = full.read_bytes()
        if b"\0" in data:
            continue
        try:
            files.append((path, data.decode("utf-8")))
        except UnicodeDecodeError:
            continue
    return files


def offenders(files: list[tuple[str, str]]) -> list[str]:
    found = []
    for path, text in files:
        for lineno, line in enumerate(text.splitlines(), 1):
            for why, pattern in FORBIDDEN.items():
                m = pattern.search(line)
                if m:
                    found.append(f"{path}:{lineno}: {why}: {m.group(0)!r}")
    return found


def test_no_tracked_file_points_outside_the_repository() -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing is tracked")
    files = tracked_text_files()
    assert any(path == "README.md" for path, _ in files)
    assert offenders(files) == []


def test_every_distribution_ships_the_repository_licence() -> None:
    licence = (ROOT / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert (ROOT / "clients" / "python" / "LICENSE").read_text() == licence
    for pyproject in (ROOT / "pyproject.toml", ROOT / "clients" / "python" / "pyproject.toml"):
        assert 'license = "Apache-2.0"' in pyproject.read_text(), pyproject
    assert '"license": "Apache-2.0"' in (ROOT / "clients" / "node" / "package.json").read_text()


@pytest.mark.parametrize(
    "line",
    [
        # Built from parts, so this file is not itself a reference outside the repository.
        "The binding contract is `" + "../" + "shared/contract.md`; in short:",
        "--out /" + "work/main/bench/results/x.json",
        "Every rule of contract section 4, through a real server",
        "the seeds' walkthrough on our REST paths",
        "# PostgreSQL driver for the shared store (issue 5).",
        "| target (issue 6 §4) | measured |",
    ],
)
def test_the_search_recognises_each_kind_of_reference(line: str) -> None:
    assert offenders([("example.md", line)]) != []


@pytest.mark.parametrize(
    "line",
    [
        "rng = random.Random(seed)",
        "See docs/api.md for every rule.",
        "sqlite:////absolute/path.db",
        "a known issue with PgBouncer",
        "tests/test_rest.py: the REST face",
    ],
)
def test_ordinary_text_passes(line: str) -> None:
    assert offenders([("example.md", line)]) == []
