"""Real Redis and PostgreSQL servers of a test's (or a benchmark's) own, on free ports, killable and restartable; and
statements on the shared PostgreSQL's admin database."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

__all__ = ["PG_ADMIN", "PG_BIN", "REDIS_SERVER", "PostgresServer", "RedisServer", "pg_admin"]

REDIS_SERVER = "/usr/bin/redis-server"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"  # the shared server's database for CREATE/DROP DATABASE


async def pg_admin(sql: str, timeout: float = 5) -> None:
    """Run one statement on the shared PostgreSQL's admin database (creating or dropping a test's own)."""
    import asyncpg  # only the PostgreSQL tests and benches need it

    conn = await asyncpg.connect(PG_ADMIN, timeout=timeout)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


class RedisServer:
    """A redis-server on a free 127.0.0.1 port. Nothing persisted, unless `persist_dir` is given: then an
    append-only file fsynced on every write, so that a kill -9 loses no acknowledged write (as production runs it)."""

    def __init__(self, port: int, log: Path, persist_dir: Path | None = None) -> None:
        self.port, self.log, self.persist_dir = port, log, persist_dir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        if self.persist_dir is None:
            args += ["--appendonly", "no"]
        else:
            self.persist_dir.mkdir(parents=True, exist_ok=True)
            args += ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.persist_dir)]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not self._pong():
            assert self.proc.poll() is None, f"redis-server exited:\n{self.log.read_text(errors='replace')}"
            assert time.monotonic() < deadline, "redis-server not answering after 10 s"
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()  # SIGKILL: no goodbye to the clients
            self.proc.wait()
            self.proc = None

    def _pong(self) -> bool:
        try:
            return bool(redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.2,
                                    socket_connect_timeout=0.2).ping())
        except redis.RedisError:
            return False


class PostgresServer:
    """A PostgreSQL 15 cluster of its own: initdb into a fresh directory owned by the `postgres` user (initdb and
    the server refuse to run as root), trust auth, listening on 127.0.0.1:`port` only. `stop` removes it all."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.root = Path(tempfile.mkdtemp(prefix="pointsman-pg-"))  # not under a test's tmp: postgres must reach it
        self.data = self.root / "data"
        self.log = self.root / "server.log"

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        shutil.chown(self.root, "postgres", "postgres")
        os.chmod(self.root, 0o700)
        self._as_postgres(PG_BIN / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                          "--no-sync")
        self._ctl("start", "-w", "-t", "60", "-l", self.log,
                  "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1")

    def restart(self) -> None:
        """pg_ctl restart -m fast: open sessions are disconnected, the server is back within seconds."""
        self._ctl("restart", "-m", "fast", "-w", "-t", "60", "-l", self.log)

    def stop(self) -> None:
        if self.data.exists():
            self._ctl("stop", "-m", "immediate", "-w", check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def query(self, sql: str) -> list[tuple[str, ...]]:
        """Rows of `sql` through psql, each a tuple of its fields as text."""
        out = self._as_postgres(PG_BIN / "psql", "-h", "127.0.0.1", "-p", str(self.port), "-At",
                                "-F", "\t", "-c", sql)
        return [tuple(line.split("\t")) for line in out.splitlines() if line]

    def _ctl(self, *args: object, check: bool = True) -> None:
        # the server it starts inherits pg_ctl's stdout: a file, never a pipe that would then never close
        with (self.root / "pg_ctl.log").open("ab") as out:
            command = ["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), str(args[0]), "-D", str(self.data),
                       *map(str, args[1:])]
            code = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=120).returncode
        if check and code != 0:
            raise RuntimeError(f"{' '.join(command)} exited {code}:\n{self.log.read_text(errors='replace')}")

    @staticmethod
    def _as_postgres(*args: object, check: bool = True) -> str:
        command = ["runuser", "-u", "postgres", "--", *map(str, args)]
        done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done.stdout
