"""Managed engine processes (`launch:`): start a model's server, wait until it answers, restart it with backoff
when it dies, stop it on shutdown, and leave no orphans."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Literal

import httpx

from backends.vllm_metrics import metrics_url_for
from config.schema import OpenAIModel
from protocol.errors import UpstreamUnavailable

__all__ = [
    "ENGINES_IN_PARENT",
    "EngineHost",
    "EngineStartupError",
    "EngineSupervisor",
    "EngineUnavailable",
    "launch_argv",
    "launched_here",
]

log = logging.getLogger("pointsman.supervisor")

State = Literal["stopped", "starting", "up", "backoff"]
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# set to "1" by `pointsman serve --workers N` (N > 1), whose parent process runs the launch: engines once for
# all its workers: each worker then reaches them as plain upstreams instead of launching its own
ENGINES_IN_PARENT = "POINTSMAN_ENGINES_IN_PARENT"
# what an engine does not inherit: the flag above, and the workers' prometheus-client directory (gateway/cli.py),
# where an engine's own series (vLLM's, a `pointsman engine`'s) would be summed into the gateway's /metrics
_NOT_INHERITED = frozenset({ENGINES_IN_PARENT, "PROMETHEUS_MULTIPROC_DIR"})


class EngineUnavailable(UpstreamUnavailable):
    """The model's managed engine is not serving now (restarting, failed to start, stopped): a fast 503 that the
    pipeline retries on another deployment or the next model of the chain."""

    status = 503
    code = "engine_unavailable"


class EngineStartupError(RuntimeError):
    """The engine exited or stayed silent before it answered; the message ends with its last output lines."""


def launch_argv(model: OpenAIModel) -> list[str]:
    """The command line of `model.launch`: its `command` plus `args`; for `backend: vllm` the command defaults
    to `vllm serve MODEL --port PORT`."""
    launch = model.launch
    if launch is None:
        raise ValueError(f"model {model.id!r} has no launch: section")
    if launch.command:
        return [*launch.command, *launch.args]
    if model.backend_kind == "vllm":
        return ["vllm", "serve", model.sent_model, "--port", str(launch.port), *launch.args]
    raise ValueError(f"model {model.id!r}: launch.command is required for backend: {model.backend_kind}")


def launched_here(model: OpenAIModel) -> bool:
    """Whether this process supervises `model`'s engine (it has `launch:`, and no parent process runs it)."""
    return model.launch is not None and os.environ.get(ENGINES_IN_PARENT) != "1"


def _parent_death_hook() -> Callable[[], None] | None:
    """A preexec_fn that has Linux send the child SIGTERM when the gateway dies, even by SIGKILL.

    libc's prctl is looked up here, in the parent: the child, between fork and exec, only calls it. The signal
    is tied to the forking thread, which for asyncio subprocesses is the event loop's, alive as long as the
    gateway serves.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the gateway died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


class EngineSupervisor:
    """Owns one child process serving a model over HTTP on loopback.

    `start()` launches it once and waits until `GET /health` (or `/v1/models`) answers 200; from then on a
    background task watches it and, when it exits unexpectedly, restarts it after `backoff_base_s * 2**n`
    seconds (at most `backoff_max_s`; n resets once a run lasted `stable_s`). The child runs in its own process
    group (its own workers go with it) and gets SIGTERM if the gateway dies. `stop()` sends the group SIGTERM,
    then SIGKILL after `stop_grace_s`.
    """

    def __init__(self, name: str, argv: list[str], base_url: str, *, env: dict[str, str] | None = None,
                 startup_timeout_s: float = 600.0, stop_grace_s: float = 10.0, backoff_base_s: float = 1.0,
                 backoff_max_s: float = 60.0, stable_s: float = 60.0, probe_interval_s: float = 0.2) -> None:
        if not argv:
            raise ValueError("an engine needs a command")
        self.name = name
        self.argv = argv
        self.base_url = base_url.rstrip("/")
        self.env = env or {}
        self.startup_timeout_s = startup_timeout_s
        self.stop_grace_s = stop_grace_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.stable_s = stable_s
        self.probe_interval_s = probe_interval_s
        self.state: State = "stopped"
        self.restarts = 0  # launches after the first
        self.last_error: str | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._exited: asyncio.Task[int] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._first: asyncio.Future[None] | None = None  # the first launch's outcome
        self._tail: deque[str] = deque(maxlen=30)
        self._stopped = False  # by stop(): requests no longer launch it, only start() does

    @classmethod
    def for_model(cls, model: OpenAIModel) -> EngineSupervisor:
        launch = model.launch
        if launch is None:
            raise ValueError(f"model {model.id!r} has no launch: section")
        if model.deployments:
            raise ValueError(f"model {model.id!r}: launch: starts one server; set base_url (or leave it out), "
                             "not deployments")
        return cls(model.id, launch_argv(model), model.base_url or f"http://127.0.0.1:{launch.port}/v1",
                   env=launch.env, startup_timeout_s=launch.startup_timeout_s)

    @property
    def up(self) -> bool:
        return self.state == "up"

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    # ---- lifecycle

    async def start(self) -> None:
        """Launch the engine (once) and wait until it answers. Raises EngineStartupError when the first launch
        fails; the supervisor keeps retrying with backoff in the background."""
        self._stopped = False
        if self._task is None:
            self._first = asyncio.get_running_loop().create_future()
            self._first.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved, never warned
            self._task = asyncio.create_task(self._supervise(), name=f"engine-{self.name}")
        if self.state == "up":
            return
        assert self._first is not None
        await asyncio.shield(self._first)

    async def ensure(self) -> None:
        """Return when the engine can take a request: the first call launches it and waits; later, while it is
        down, raise EngineUnavailable at once."""
        if self.state == "up":
            return
        if self._stopped:
            raise self._unavailable()
        if self._task is None or (self._first is not None and not self._first.done()):
            try:
                await self.start()
            except EngineStartupError as exc:
                raise self._unavailable() from exc
            if self.state == "up":
                return
        raise self._unavailable()

    def _unavailable(self) -> EngineUnavailable:
        why = f": {self.last_error.splitlines()[0]}" if self.last_error else ""
        return EngineUnavailable(f"The engine of model '{self.name}' is {self.state}{why}")

    async def stop(self) -> None:
        """Stop watching and stop the process group: SIGTERM, then SIGKILL after the grace period."""
        self._stopped = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._first is not None and not self._first.done():
            self._first.set_exception(EngineStartupError(f"engine {self.name} was stopped while starting"))
        await self._terminate()
        self.state = "stopped"

    # ---- the watch loop

    async def _supervise(self) -> None:
        failures = 0
        while True:
            try:
                await self._spawn()
                await self._wait_ready()
            except EngineStartupError as exc:
                self.last_error = str(exc)
                log.error("engine %s failed to start: %s", self.name, exc)
                await self._terminate()
                self._settle_first(exc)
            else:
                self.state = "up"
                self.last_error = None
                self._settle_first(None)
                up_since = time.monotonic()
                log.info("engine %s (pid %s) answers at %s", self.name, self._proc and self._proc.pid, self.base_url)
                assert self._exited is not None
                code = await asyncio.shield(self._exited)
                self.state = "backoff"
                ran = time.monotonic() - up_since
                self.last_error = f"exited with {code} after {ran:.1f} s"
                await self._drain_output()
                log.warning("engine %s exited with %s after %.1f s; last output:\n%s", self.name, code, ran,
                            self._last_lines())
                await self._terminate()  # whatever is left of its process group
                if ran >= self.stable_s:
                    failures = 0
            self.state = "backoff"
            delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** failures)
            failures += 1
            log.info("restarting engine %s in %.1f s", self.name, delay)
            await asyncio.sleep(delay)
            self.restarts += 1

    def _settle_first(self, exc: EngineStartupError | None) -> None:
        first = self._first
        if first is not None and not first.done():
            if exc is None:
                first.set_result(None)
            else:
                first.set_exception(exc)

    async def _spawn(self) -> None:
        self.state = "starting"
        self._tail.clear()
        env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
        env.update(self.env)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True,
                preexec_fn=_parent_death_hook(),
            )
        except OSError as exc:
            raise EngineStartupError(f"cannot run {self.argv[0]!r}: {exc}") from exc
        self._proc = proc
        self._exited = asyncio.ensure_future(proc.wait())
        assert proc.stdout is not None
        self._reader = asyncio.create_task(self._relay(proc.stdout), name=f"engine-{self.name}-output")
        log.info("engine %s started (pid %d): %s", self.name, proc.pid, " ".join(self.argv))

    async def _relay(self, stream: asyncio.StreamReader) -> None:
        """The child's output into the gateway's log, line by line, keeping the last lines for error messages."""
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line over the reader's limit: skipped
                continue
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()
            self._tail.append(text)
            log.info("[%s] %s", self.name, text)

    def _last_lines(self) -> str:
        return "\n".join(self._tail) or "(no output)"

    async def _wait_ready(self) -> None:
        assert self._exited is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.startup_timeout_s
        urls = (metrics_url_for(self.base_url).removesuffix("/metrics") + "/health", self.base_url + "/models")
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
            while True:
                if self._exited.done():
                    await self._drain_output()
                    raise EngineStartupError(f"engine {self.name} exited with {self._exited.result()} before it "
                                             f"answered; last output:\n{self._last_lines()}")
                if await _answers(client, urls):
                    return
                if loop.time() >= deadline:
                    raise EngineStartupError(f"engine {self.name} did not answer on {urls[0]} within "
                                             f"{self.startup_timeout_s:g} s; last output:\n{self._last_lines()}")
                await asyncio.wait({self._exited}, timeout=min(self.probe_interval_s, deadline - loop.time()))

    async def _drain_output(self) -> None:
        """Let the relay read what the child wrote before it exited (its error message), briefly."""
        if self._reader is not None:
            await asyncio.wait({self._reader}, timeout=1.0)

    async def _terminate(self) -> None:
        """SIGTERM to the process group, SIGKILL after the grace period, then SIGKILL to any straggler."""
        proc, exited = self._proc, self._exited
        if proc is None or exited is None:
            return
        if not exited.done():
            _signal_group(proc.pid, signal.SIGTERM)
            await asyncio.wait({exited}, timeout=self.stop_grace_s)
            if not exited.done():
                log.warning("engine %s (pid %d) ignored SIGTERM for %g s: killing it", self.name, proc.pid,
                            self.stop_grace_s)
                _signal_group(proc.pid, signal.SIGKILL)
                await exited
        _signal_group(proc.pid, signal.SIGKILL)  # workers it started, still in its group
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self._proc = self._exited = self._reader = None


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _answers(client: httpx.AsyncClient, urls: tuple[str, ...]) -> bool:
    for url in urls:
        try:
            response = await client.get(url)
        except httpx.HTTPError:
            return False  # not listening yet
        if response.status_code == 200:
            return True
    return False


class EngineHost:
    """Supervisors on an event loop of their own thread: how `pointsman serve` with several workers runs each
    `launch:` engine once, in the parent process, for all its workers. The thread lives until `stop()` (the
    children's parent-death signal is tied to it)."""

    def __init__(self, models: list[OpenAIModel]) -> None:
        self.supervisors = [EngineSupervisor.for_model(m) for m in models]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="pointsman-engines", daemon=True)

    def start(self) -> None:
        """Launch every engine (without waiting: workers' readiness checks see when each answers)."""
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        for supervisor in self.supervisors:
            self._loop.create_task(self._launch(supervisor))
        self._loop.run_forever()

    @staticmethod
    async def _launch(supervisor: EngineSupervisor) -> None:
        with contextlib.suppress(EngineStartupError):  # logged; the supervisor retries with backoff
            await supervisor.start()

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop every engine (SIGTERM, SIGKILL after the grace period), then the thread."""
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._stop_all(), self._loop).result(timeout_s)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout_s)

    async def _stop_all(self) -> None:
        await asyncio.gather(*(s.stop() for s in self.supervisors))
