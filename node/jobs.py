"""Install jobs: `POST /mesh/models/install` starts one, clients poll or follow it.

A job wraps one `gallery.install` call. `serve()` owns every job's task (commands come
over a channel, so no nursery is stored on an object). Each progress report replaces the
job's snapshot and wakes followers through a fresh `trio.Event`, so an SSE follower
awaits changes instead of polling. Two jobs for the same model share one: asking again
while it runs returns the running job (the installer's lock would serialise them anyway).
Finished jobs are kept (the last MAX_KEPT) so a client can read how it ended.
`sources` maps each installed file to where it came from (peer:<name> | origin | local);
`source` is the same in one string (the distinct sources, in order).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable

import trio

from gallery import GalleryEntry, InstalledModel, Progress, Store, install
from mesh.errors import MeshError, NotFound

MAX_KEPT = 100


@dataclass
class Job:
    id: str
    model: str
    state: str = "queued"           # queued | downloading | verifying | loading | done | failed
    file: str | None = None
    bytes_done: int = 0
    bytes_total: int | None = None
    speed_bps: float = 0.0
    files_done: int = 0
    files_total: int = 0
    error: str | None = None
    source: str | None = None
    sources: dict[str, str] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    finished: float | None = None
    changed: trio.Event = field(default_factory=trio.Event, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("changed")
        d["object"] = "mesh.install_job"
        d["speed_bps"] = round(self.speed_bps, 1)
        return d

    @property
    def ended(self) -> bool:
        return self.state in ("done", "failed")

    def _touch(self) -> None:
        old, self.changed = self.changed, trio.Event()
        old.set()


class Jobs:
    def __init__(self, store: Store, *, peer_fetchers: Callable[[], list] = list,
                 after_install: Callable[[InstalledModel], Awaitable[None]] | None = None) -> None:
        self.store = store
        self.peer_fetchers = peer_fetchers
        self.after_install = after_install
        self.jobs: dict[str, Job] = {}
        self._ids = itertools.count(1)
        self._send, self._recv = trio.open_memory_channel(64)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started(self)
            async for job, entry, load in self._recv:
                nursery.start_soon(self._run, job, entry, load)

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no install job {job_id!r}", code="job_not_found")
        return job

    def start(self, entry: GalleryEntry, *, load: bool = False) -> Job:
        for job in self.jobs.values():
            if job.model == entry.id and not job.ended:
                return job
        job = Job(id=f"job-{next(self._ids)}-{int(time.time())}", model=entry.id,
                  files_total=len(entry.files))
        self.jobs[job.id] = job
        for old in [j for j in self.jobs.values() if j.ended][:-MAX_KEPT]:
            del self.jobs[old.id]
        self._send.send_nowait((job, entry, load))
        return job

    async def _run(self, job: Job, entry: GalleryEntry, load: bool) -> None:
        def progress(p: Progress) -> None:
            job.state = p.state if p.state != "done" else job.state
            job.file, job.bytes_done, job.bytes_total = p.file, p.bytes_done, p.bytes_total
            job.speed_bps, job.files_done, job.files_total = p.speed_bps, p.files_done, p.files_total
            if p.source and p.file:
                job.sources[p.file] = p.source
                job.source = ", ".join(dict.fromkeys(job.sources.values()))
            job._touch()

        try:
            model = await install(entry, self.store, progress=progress,
                                  peer_fetchers=self.peer_fetchers())
            if load and self.after_install is not None:
                job.state = "loading"
                job._touch()
                await self.after_install(model)
            job.state = "done"
        except MeshError as exc:
            job.state, job.error = "failed", exc.message
        except Exception as exc:  # the job must end, whatever broke
            job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            job.finished = time.time()
            job._touch()
