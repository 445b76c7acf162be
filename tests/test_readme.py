"""The README as a newcomer uses it: its commands run as written, its settings table is whole.

The walkthrough test copies the repository (its tracked and new files) into a
temporary directory, the way a fresh clone looks, and runs the README's marked
blocks there in document order, in one bash session:

- `<!-- readme-test: server -->` marks the `make run` block. The test starts
  the same `tokenservice serve` that `make run` runs (the Makefile is checked
  for it), in the background, on free ports set with TOKENSERVICE_GRPC_PORT and
  TOKENSERVICE_HTTP_PORT;
- `<!-- readme-test -->` marks a shell block to run;
- `<!-- readme-test: save as NAME -->` marks a block the README tells the reader
  to save as NAME; the test writes it there;
- `<!-- readme-test: file PATH -->` marks a block that shows the file PATH,
  which must be identical to it.

The only change made to the commands: `127.0.0.1:50051`, `localhost:50051`,
`127.0.0.1:8080` and `localhost:8080` become the free ports (the README says so
next to the walkthrough). `.venv` in the copy is the virtual environment running
the tests. Every block of the "Five minutes" section must be marked, so a new
step there cannot escape this test.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TOKENSERVICE, cli, free_port

from tokenservice_server import config as config_module

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

_MARKER = re.compile(r"<!--\s*readme-test(?::\s*(?P<arg>[^>]*?))?\s*-->")
_FENCE = re.compile(r"^```(?P<lang>[\w-]*)\s*$")


@dataclass
class Block:
    """One fenced block of the README, with the section it is in and its marker."""

    lang: str
    text: str
    section: str
    line: int
    marker: str | None  # None: unmarked; "": run it; else the marker's argument


def readme_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    lines = text.splitlines(keepends=True)
    section, pending, i = "", None, 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        marker = _MARKER.fullmatch(line.strip())
        if marker:
            pending = marker.group("arg") or ""
            i += 1
            continue
        fence = _FENCE.match(line)
        if fence:
            start = i + 1
            end = start
            while not lines[end].startswith("```"):
                end += 1
            blocks.append(Block(fence.group("lang"), "".join(lines[start:end]), section,
                                start, pending))
            pending, i = None, end + 1
            continue
        if line.strip():
            pending = None  # a marker applies only to the block right after it
        i += 1
    return blocks


def _require(tool: str) -> None:
    if shutil.which(tool) is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {tool} is missing", pytrace=False)
        pytest.skip(f"{tool} is needed to run the README's commands")


def _fresh_copy(dest: Path, venv: bool = True) -> None:
    """The repository's tracked and new (not ignored) files, as a clone would have them,
    with `.venv` pointing at the environment running the tests unless venv is False."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True, timeout=60,
    ).stdout.decode()
    for name in filter(None, listing.split("\0")):
        source = ROOT / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    if venv:
        (dest / ".venv").symlink_to(Path(sys.prefix))


def _with_ports(text: str, grpc_port: int, http_port: int) -> str:
    ports = {"50051": str(grpc_port), "8080": str(http_port)}
    return re.sub(r"\b(127\.0\.0\.1|localhost):(50051|8080)\b",
                  lambda m: f"{m.group(1)}:{ports[m.group(2)]}", text)


def _wait_for_http(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"tokenservice serve exited:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered 200:\n{log.read_text()}")


def test_every_walkthrough_block_is_marked_and_shown_files_match() -> None:
    blocks = readme_blocks(README.read_text())
    walkthrough = [b for b in blocks if b.section.startswith("Five minutes")]
    assert walkthrough, "the README has no 'Five minutes' section"
    unmarked = [b.line for b in walkthrough if b.marker is None]
    assert unmarked == [], f"README blocks at lines {unmarked} are not run by this test"
    servers = [b for b in blocks if b.marker == "server"]
    assert [b.text.strip() for b in servers] == ["make run"]
    # What the test runs in place of `make run`.
    assert re.search(r"^run: install-run\n\t\$\(VENV\)/bin/tokenservice serve\n",
                     (ROOT / "Makefile").read_text(), re.MULTILINE)
    for block in blocks:
        if block.marker and block.marker.startswith("file "):
            shown = block.marker.removeprefix("file ").strip()
            assert block.text == (ROOT / shown).read_text(), f"README differs from {shown}"


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path: Path) -> None:
    for tool in ("bash", "curl", "node", "npm"):
        _require(tool)
    clone = tmp_path / "clone"
    _fresh_copy(clone)
    grpc_port, http_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSERVICE_")}
    env.update(
        TOKENSERVICE_GRPC_PORT=str(grpc_port),
        TOKENSERVICE_HTTP_PORT=str(http_port),
        TOKENSERVICE_BCRYPT_ROUNDS="4",  # fast, for the test only
        TOKENSERVICE_TARGET=f"127.0.0.1:{grpc_port}",  # examples/walkthrough.py's setting
    )

    script = ["set -euo pipefail"]
    runs: list[str] = []
    for block in readme_blocks(README.read_text()):
        if block.marker is None or block.marker == "server" or block.marker.startswith("file "):
            continue
        text = _with_ports(block.text, grpc_port, http_port)
        if block.marker.startswith("save as "):
            (clone / block.marker.removeprefix("save as ").strip()).write_text(text)
            continue
        assert block.lang in ("sh", "bash", "shell", ""), f"line {block.line}: not a shell block"
        runs.append(f"README line {block.line}")
        script += [f"printf '\\n=== %s\\n' '{runs[-1]}'", text]
    script.append("printf '\\n=== done\\n'")

    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([TOKENSERVICE, "serve"], cwd=clone, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_for_http(f"http://127.0.0.1:{http_port}/healthz", server, log)
        result = subprocess.run(["bash", "-c", "\n".join(script)], cwd=clone, env=env,
                                capture_output=True, text=True, timeout=600,
                                stdin=subprocess.DEVNULL)
    finally:
        server.terminate()
        server.wait(timeout=60)
    out = result.stdout + result.stderr
    ran = re.findall(r"^=== (.*)$", result.stdout, re.MULTILINE)
    assert result.returncode == 0, f"failed in {ran[-1] if ran else 'the first block'}:\n{out}"
    assert ran == [*runs, "done"]

    # What a reader sees, step by step.
    assert re.search(r"^new token, shown once: tks_\w{50}$", result.stdout, re.MULTILINE)
    assert "it belongs to: you@example.com acme ['pass:read']" in result.stdout
    assert "revoked at: " in result.stdout
    assert '"name":"CI/CD Pipeline"' in result.stdout  # REST create, then list
    assert "StatusCode.INVALID_ARGUMENT ['name', 'scopes']" in result.stdout
    assert re.search(r'"revoked":\{"id":"[0-9a-f-]{36}","revoked":true\}', result.stdout)  # Node
    assert re.search(r"\b0 failed\b", result.stdout)  # the curl walkthrough

    # What the commands leave behind (client.py, the database, node_modules) does not
    # upset the linter: `make lint` still passes after following the README.
    ruff = Path(sys.prefix) / "bin" / "ruff"
    if ruff.exists():
        linted = subprocess.run([str(ruff), "check", "."], cwd=clone, capture_output=True,
                                text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert linted.returncode == 0, linted.stdout + linted.stderr

    # The server the README started is the one they all used.
    listed = cli("user", "add", "--email", "you@example.com", "--org", "acme",
                 "--permissions", "pass:read", "--database-url",
                 f"sqlite:///{clone / 'tokenservice.db'}")
    assert listed.returncode != 0 and "already exists" in listed.stderr


@pytest.mark.slow
def test_make_run_installs_only_what_serving_needs(tmp_path: Path) -> None:
    """`make run` on a fresh clone: the runtime dependencies, none of the dev tools,
    and a server that starts and serves its pages."""
    _require("make")
    clone = tmp_path / "clone"
    _fresh_copy(clone, venv=False)
    installed = subprocess.run(["make", "install-run"], cwd=clone, capture_output=True,
                               text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    python = clone / ".venv" / "bin" / "python"
    for dev_only in ("pytest", "ruff", "playwright", "schemathesis", "grpc_tools", "httpx"):
        probe = subprocess.run([str(python), "-c", f"import {dev_only}"], capture_output=True,
                               text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert "ModuleNotFoundError" in probe.stderr, f"{dev_only} is installed by make run"

    http_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSERVICE_")}
    env.update(TOKENSERVICE_GRPC_PORT=str(free_port()), TOKENSERVICE_HTTP_PORT=str(http_port))
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([str(clone / ".venv" / "bin" / "tokenservice"), "serve"],
                                  cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL)
    try:
        _wait_for_http(f"http://127.0.0.1:{http_port}/healthz", server, log)
        for page in ("/docs/", "/console/", "/openapi.json"):
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{page}", timeout=10) as r:
                assert r.status == 200, page
    finally:
        server.terminate()
        server.wait(timeout=60)


# -- the Configuration table --------------------------------------------------


class _RecordingEnviron(Mapping[str, str]):
    """An empty environment that remembers every name the config module asks for."""

    def __init__(self) -> None:
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        self.asked.add(str(key))
        return False

    def get(self, key: str, default=None):  # type: ignore[override]
        self.asked.add(key)
        return default

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def settings_the_code_reads() -> set[str]:
    """Every TOKENSERVICE_* variable the config module reads: the ones it asks the
    environment for, one per Config field, and any it names in its source."""
    environ = _RecordingEnviron()
    config_module.load_config({}, environ)
    from_fields = {config_module.ENV_PREFIX + f.name.upper()
                   for f in dataclasses.fields(config_module.Config)}
    source = Path(config_module.__file__).read_text()
    in_source = set(re.findall(r"TOKENSERVICE_[A-Z0-9_]+", source))
    return {n for n in environ.asked if n.startswith("TOKENSERVICE_")} | from_fields | in_source


def configuration_table() -> list[dict[str, str]]:
    text = README.read_text()
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert header == ["setting", "flag", "environment", "default"]
    return [dict(zip(header, (c.strip() for c in row.strip("|").split("|")), strict=True))
            for row in rows[2:]]


def _documented(value: object) -> list[str]:
    """How a default may be spelled in the table."""
    if isinstance(value, bool):
        return ["true", "on"] if value else ["false", "off"]
    if isinstance(value, float) and value.is_integer():
        return [str(int(value)), str(value)]
    if isinstance(value, tuple):
        return [",".join(value)]
    return [str(value)]


def test_configuration_table_lists_every_setting_the_code_reads() -> None:
    table = configuration_table()
    documented: dict[str, tuple[str, str]] = {}
    for row in table:
        names = re.findall(r"TOKENSERVICE_[A-Z0-9_]+", row["environment"])
        defaults = [d.strip() for d in row["default"].split(" / ")]
        for n, name in enumerate(names):
            documented[name] = (row["flag"], defaults[n] if len(defaults) == len(names) else "")
    read = settings_the_code_reads()
    assert sorted(read - documented.keys()) == [], "settings missing from the README's table"
    assert sorted(documented.keys() - read) == [], "table rows for settings nobody reads"

    # Each default is the code's, where the code has one.
    defaults = {config_module.ENV_PREFIX + f.name.upper(): f.default
                for f in dataclasses.fields(config_module.Config)}
    for name, (_, shown) in documented.items():
        value = defaults.get(name)
        if value is None or value is dataclasses.MISSING:
            continue
        assert shown.strip("`") in _documented(value), f"{name}: README says {shown}"


def test_every_flag_in_the_configuration_table_is_accepted_by_serve() -> None:
    usage = cli("serve", "--help").stdout
    rest_usage = cli("rest", "--help").stdout
    for row in configuration_table():
        # A row for `tokenservice rest` alone says so first.
        command, text = ("rest", rest_usage) if row["setting"].startswith("`rest` only") else (
            "serve", usage)
        for flag in re.findall(r"--[a-z][a-z0-9-]*", row["flag"]):
            assert re.search(rf"{flag}\b", text), f"`tokenservice {command}` has no {flag}"


def test_readme_parser_sees_markers_only_right_before_a_block() -> None:
    text = ("## Five minutes\n\n<!-- readme-test -->\n```sh\necho a\n```\n\n"
            "<!-- readme-test -->\n\nprose\n```sh\necho b\n```\n"
            "<!-- readme-test: save as x.py -->\n```python\nprint(1)\n```\n")
    blocks = readme_blocks(text)
    assert [(b.text, b.marker) for b in blocks] == [
        ("echo a\n", ""), ("echo b\n", None), ("print(1)\n", "save as x.py")]
