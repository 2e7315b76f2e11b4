"""Real `mesh up` processes for tests: start, wait for a line they print, stop.

Stdout is read by a thread into a queue, so waiting for a line is waiting for an event
(with a deadline), never a sleep. Stderr (the node's log) goes to `<home>/node.log`.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MESH = [sys.executable, "-m", "node.cli"]


def models_dir() -> Path:
    """One models directory shared by every test run (install once, reuse)."""
    d = Path(os.environ.get("MESH_TEST_MODELS_DIR") or REPO / ".cache" / "models")
    d.mkdir(parents=True, exist_ok=True)
    return d


def models_with(tmp: Path, model_id: str, overrides: dict) -> Path:
    """A models dir of our own under `tmp` holding the installed `model_id` (its files
    symlinked) with `overrides` in its model.yaml config; the model must be installed in
    models_dir() (any node that serves it installs it)."""
    from gallery.store import Store
    src = Store(models_dir()).get(model_id)
    if src is None:
        raise LookupError(f"{model_id} is not installed in {models_dir()}")
    dst = tmp / "models" / src.id
    dst.mkdir(parents=True)
    for f in src.files:
        (dst / f.path).symlink_to(src.dir / f.path)
    shutil.copy(src.dir / "model.yaml", dst / "model.yaml")
    Store(tmp / "models").set_overrides(model_id, overrides)
    return tmp / "models"


def until(pred, what: str, timeout: float = 30.0, interval: float = 0.1):
    """pred() until it is truthy (its value), for state only polling can read (another
    process's log file, its HTTP view); AssertionError naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)
    return value


@dataclass
class MeshNode:
    home: Path
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    lines: list[str] = field(default_factory=list)
    api: str = ""
    prefix: list[str] = field(default_factory=list)   # e.g. ["ip", "netns", "exec", "ns1"]

    def start(self) -> "MeshNode":
        self.home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
        env.update({"PYTHONUNBUFFERED": "1", **self.env})
        self._log = open(self.home / "node.log", "ab")
        self.proc = subprocess.Popen(
            [*self.prefix, *MESH, "up", "--home", str(self.home),
             *([] if "--host" in self.args else ["--host", "127.0.0.1"]),
             *([] if "--port" in self.args else ["--port", "0"]),
             *([] if "--models-dir" in self.args else ["--models-dir", str(models_dir())]),
             *self.args],
            stdout=subprocess.PIPE, stderr=self._log, env=env, cwd=REPO, text=True)
        self._q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        assert self.proc and self.proc.stdout
        for line in self.proc.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match:
        """The first stdout line (from now on) matching `pattern`; fails on exit or timeout."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line matching {pattern!r} in {timeout}s; "
                                     f"stdout: {self.lines[-10:]}; log: {self.log_tail()}")
            try:
                line = self._q.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self._q.put(None)
                raise AssertionError(f"node exited ({self.proc.wait()}) before {pattern!r}; "
                                     f"stdout: {self.lines[-10:]}; log: {self.log_tail()}")
            self.lines.append(line)
            m = rx.search(line)
            if m:
                return m

    def wait_ready(self, timeout: float = 900) -> "MeshNode":
        self.api = self.wait_for(r"mesh: api (\S+)/v1", timeout=60).group(1)
        self.wait_for(r"mesh: ready", timeout=timeout)
        return self

    @property
    def v1(self) -> str:
        return self.api + "/v1"

    def log_tail(self, n: int = 4000) -> str:
        try:
            return (self.home / "node.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"node did not stop within {timeout}s of {sig}")
        finally:
            self._log.close()


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*MESH, *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, timeout=timeout, input=input)


SMOLLM2_NO_END = {"0": -100, "2": -100}     # SmolLM2's <|endoftext|> and <|im_end|>


@contextmanager
def hogging(client, model: str, n: int, no_end: dict[str, int] = SMOLLM2_NO_END):
    """`n` streaming generations that cannot end early (their end tokens banned with
    logit_bias), each past its first token when the block is entered: `n` slots held.
    Leaving the block closes them (the node cancels them)."""
    started = threading.Barrier(n + 1)
    stop = threading.Event()

    def hog() -> None:
        with client.chat.completions.create(
                model=model, stream=True, max_tokens=3000, temperature=1.0, logit_bias=no_end,
                messages=[{"role": "user", "content": "Tell a very long story."}]) as s:
            for i, _ in enumerate(s):
                if i == 1:
                    started.wait()
                if stop.is_set():
                    return

    hogs = [threading.Thread(target=hog, daemon=True) for _ in range(n)]
    for t in hogs:
        t.start()
    try:
        started.wait(timeout=120)
        yield
    finally:
        stop.set()
        for t in hogs:
            t.join(timeout=120)
