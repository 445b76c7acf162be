"""The client distribution installs alone, in a fresh virtual environment without the
server's dependencies, and works there against a real tokenservice."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIENT_DIST = ROOT / "clients" / "python"

pytestmark = pytest.mark.slow


@pytest.fixture
def database_url(sqlite_database_url: str) -> str:
    return sqlite_database_url


@pytest.fixture(scope="module")
def fresh_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv (no system site-packages) with only `pip install ./clients/python`."""
    work = tmp_path_factory.mktemp("client-install")
    # A copy, so the build leaves no egg-info or build/ behind in the work tree.
    source = work / "python"
    shutil.copytree(
        CLIENT_DIST, source,
        ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__", "*.pyc"),
    )
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(source)],
        capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return python


def run(python: Path, code: str) -> subprocess.CompletedProcess[str]:
    # -I: isolated mode, so neither the work tree nor PYTHONPATH leaks in.
    return subprocess.run(
        [str(python), "-I", "-c", code], capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL, cwd="/",
    )


def test_client_imports_without_server_dependencies(fresh_python: Path) -> None:
    result = run(fresh_python, (
        "import tokenservice_client, tokenservice.v1.token_service_pb2_grpc\n"
        "print(tokenservice_client.__file__)\n"
        "from tokenservice_client import TokenServiceClient, AsyncTokenServiceClient, "
        "AuthInterceptor, AsyncAuthInterceptor, current_principal, token_credentials\n"
    ))
    assert result.returncode == 0, result.stderr
    assert str(ROOT) not in result.stdout  # the installed copy, not the work tree
    for server_only in ("peewee", "bcrypt", "tokenservice_server", "uvicorn", "psycopg2"):
        absent = run(fresh_python, f"import {server_only}")
        assert absent.returncode != 0 and "ModuleNotFoundError" in absent.stderr, server_only


def test_installed_client_talks_to_a_real_server(fresh_python: Path, ts) -> None:
    email = f"installed-{uuid.uuid4().hex[:8]}@example.com"
    ts.add_user(email, "acme", ["api_token:manage", "pass:read"])
    token = ts.mint(email, ["api_token:manage", "pass:read"])
    result = run(fresh_python, (
        "import sys\n"
        "from tokenservice_client import TokenServiceClient, InvalidArgument\n"
        f"c = TokenServiceClient({ts.target!r}, token={token!r})\n"
        "made = c.create_token('from a fresh venv', ['pass:read'])\n"
        "print(c.authenticate(made.token).user_email)\n"
        "try:\n"
        "    c.create_token('', ['pass:read'])\n"
        "except InvalidArgument as e:\n"
        "    print(','.join(e.fields))\n"
    ))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [email, "name"]
