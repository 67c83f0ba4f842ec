"""A throwaway PostgreSQL server for tests and benchmarks: :class:`TempPostgres`.

It runs ``initdb`` into a temporary folder and starts ``postgres`` there with
``pg_ctl``, listening only on a Unix socket in that folder (no TCP port to collide
with), and removes the folder when stopped. The server binaries are found on ``PATH``
or under Debian's ``/usr/lib/postgresql/*/bin``. PostgreSQL refuses to run as root: run
as root, the server runs as the ``postgres`` system user (or ``nobody``) through
``runuser``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile

__all__ = ["TempPostgres", "find_pg_bin"]


def find_pg_bin() -> str | None:
    """The folder holding ``initdb`` and ``pg_ctl``, or None when PostgreSQL is missing."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return os.path.dirname(found)
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(folder, "initdb")):
            return folder
    return None


def _server_user() -> str | None:
    """The system user to run the server as when we are root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("running as root, and no 'postgres' or 'nobody' user to run PostgreSQL as")


class TempPostgres:
    """A PostgreSQL server in a temporary folder (see the module notes).

    Use it as a context manager, or call :meth:`start` and :meth:`stop`.
    :meth:`url` gives a ``postgresql://`` URL to one of its databases; :meth:`create_database`
    makes a fresh one.
    """

    user = "aiobatch"

    def __init__(self, bin_dir: str | None = None, *, durable: bool = False) -> None:
        found = bin_dir or find_pg_bin()
        if found is None:
            raise RuntimeError(
                "PostgreSQL's initdb was not found (on PATH or /usr/lib/postgresql/*/bin); "
                "install the distribution's postgresql package"
            )
        self.bin_dir = found
        self.folder = ""
        #: commits survive the server being killed (:meth:`halt`): slower, for such tests
        self.durable = durable
        self._as = _server_user()

    def _cmd(self, name: str, *args: str) -> list[str]:
        command = [os.path.join(self.bin_dir, name), *args]
        if self._as is not None:
            command = ["runuser", "-u", self._as, "--", *command]
        return command

    @property
    def socket_dir(self) -> str:
        return os.path.join(self.folder, "sock")

    def start(self) -> TempPostgres:
        self.folder = tempfile.mkdtemp(prefix="aiobatch-pg-")
        data = os.path.join(self.folder, "data")
        os.mkdir(self.socket_dir)
        if self._as is not None:
            entry = pwd.getpwnam(self._as)
            os.chmod(self.folder, 0o755)
            for path in (self.folder, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        try:
            subprocess.run(
                self._cmd(
                    "initdb", "-D", data, "-U", self.user, "--auth=trust", "-E", "UTF8", "--no-sync"
                ),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                check=True,
            )
            self._pg_start()
        except subprocess.CalledProcessError as exc:
            log = ""
            with contextlib.suppress(OSError), open(os.path.join(self.folder, "log")) as fh:
                log = fh.read()[-2000:]
            self._remove()
            raise RuntimeError(
                f"could not start a test PostgreSQL: {exc.stderr.decode(errors='replace')}{log}"
            ) from exc
        return self

    def _pg_start(self) -> None:
        options = (
            f"-c listen_addresses='' -k {self.socket_dir} -c fsync=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        if not self.durable:
            options += " -c synchronous_commit=off"
        subprocess.run(
            self._cmd(
                "pg_ctl",
                "-D",
                os.path.join(self.folder, "data"),
                "-o",
                options,
                "-l",
                os.path.join(self.folder, "log"),
                "-w",
                "start",
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            check=True,
        )

    def halt(self) -> None:
        """Stop the server at once (``pg_ctl stop -m immediate``: a crash), keeping its data;
        :meth:`restart` brings it back."""
        subprocess.run(
            self._cmd("pg_ctl", "-D", os.path.join(self.folder, "data"), "-m", "immediate", "-w",
                      "stop"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            check=True,
            timeout=60,
        )  # fmt: skip

    def restart(self) -> None:
        """Start the server again after :meth:`halt` (it recovers like after a crash)."""
        self._pg_start()

    def url(self, database: str = "postgres") -> str:
        """A URL to ``database`` on this server (over its socket)."""
        return f"postgresql://{self.user}@/{database}?host={self.socket_dir}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL with ``psql`` (autocommit) and return its output."""
        psql = os.path.join(self.bin_dir, "psql")
        if not os.path.exists(psql):
            psql = shutil.which("psql") or "psql"
        done = subprocess.run(
            [
                psql,
                "-X",
                "-q",
                "-A",
                "-t",
                "-h",
                self.socket_dir,
                "-U",
                self.user,
                "-d",
                database,
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ],
            capture_output=True,
            check=True,
            text=True,
        )
        return done.stdout

    def create_database(self, name: str) -> str:
        """Make a fresh database and return its URL."""
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if not self.folder:
            return
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            subprocess.run(
                self._cmd(
                    "pg_ctl",
                    "-D",
                    os.path.join(self.folder, "data"),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=True,
                timeout=60,
            )
        self._remove()

    def _remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = ""

    def __enter__(self) -> TempPostgres:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
