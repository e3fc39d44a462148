"""A real PostgreSQL server for tests (Debian's postgresql package): ``initdb`` in a
temporary directory, listening on 127.0.0.1 and a socket in that directory only,
stopped on exit. Run as the ``postgres`` user when the tests run as root (the server
refuses root)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

USER, PASSWORD, DATABASE = "ftx", "s3cret-pw", "ftx"


def binaries() -> Path | None:
    """The directory of initdb and pg_ctl, or None when PostgreSQL is not installed."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


def why_unavailable() -> str | None:
    if binaries() is None:
        return "PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run does it as root)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a postgres user to run the server as"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def postgres() -> Iterator[str]:
    """Yield the URL of a fresh database (password auth, md5) on a free port."""
    with server() as (url, _):
        yield url


@contextmanager
def server() -> Iterator[tuple[str, Callable[[str], None]]]:
    """(the URL, ``pg_ctl(action)``): a fresh database whose server a test can
    ``"stop"`` (at once, as a crash or a lost network would) and ``"start"`` again."""
    bin_dir, root = binaries(), Path(tempfile.mkdtemp(prefix="ftx-pg-", dir="/tmp"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(root, entry.pw_uid, entry.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port, data = free_port(), root / "data"
    (root / "pw").write_text(PASSWORD + "\n")
    if as_user:
        os.chown(root / "pw", pwd.getpwnam("postgres").pw_uid, -1)

    def run(*command: str) -> None:
        done = subprocess.run([*as_user, *command], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")

    run(str(bin_dir / "initdb"), "-D", str(data), "-U", USER, "--pwfile", str(root / "pw"), "-A", "md5")
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c max_connections=100"

    def pg_ctl(action: str) -> None:
        if action == "stop":
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        else:
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-o", options, "-w", "start")

    pg_ctl("start")
    try:
        env = os.environ | {"PGPASSWORD": PASSWORD}
        created = subprocess.run(
            [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", USER, DATABASE],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        if created.returncode != 0:
            raise RuntimeError(f"createdb failed: {created.stderr}")
        yield f"postgresql+psycopg2://{USER}:{PASSWORD}@127.0.0.1:{port}/{DATABASE}", pg_ctl
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
