"""Worker process entry point: `python -m node.worker_main --socket PATH --backend NAME ...`.

The child connects to the Unix socket its parent listens on, loads the model, says
`ready` (or `fatal`), then serves frames until the socket closes or `unload` arrives.

Frames (mesh/wire/framing.py), parent -> child:
    {"op": "run", "id": N, "request": Request}     mesh/wire/inference.py
    {"op": "cancel", "target": N} | {"op": "stats", "id": -1} | {"op": "unload"}
child -> parent:
    {"type": "ready", "info": {...}} | {"type": "fatal", "error": str}   once, at start
    {"id": N, "event": Event}                                            per request
    {"id": -1, "stats": {...}}

Each kind of work has one thread and a FIFO queue (generation, embeddings, audio, token
ids), so an
embedding request never waits behind a long generation; `cancel` and `stats` are answered
from the reader thread at once. The parent side lives in node/workers.py.

The llama backend's `submit(request, emit, cancel)` (continuous batching) takes a
generation without blocking the generation thread: it validates the request (raising a
BadRequest before any event), queues it in its own scheduler and emits the request's
events from there; the request is over at its `Done` or `Failed`.

The piper backend's `speak(request, cancel)` is a generator of events: `Audio` pieces
sent as each sentence is synthesized, then `Done` (cancelled between two sentences when
asked); its checks (voice, format) raise before the first piece.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import socket
import sys
import threading
import traceback
from typing import Any

from mesh.errors import BadRequest, MeshError
from mesh.wire.framing import FrameError, SyncFramer
from mesh.wire.inference import (TERMINAL, Delta, Done, Failed, Result, decode_request,
                                 encode_event, failed_from_error, merged)

log = logging.getLogger("node.worker")

# libgomp's spin-wait before a thread sleeps at a barrier (ggml's CPU backend joins its
# threads with `omp barrier` hundreds of times per forward pass). The default, 300,000
# spins, is right on an idle machine, but when the cores are shared (the node's own API
# process, clients, other services) a waiting thread spins through the time slice its
# descheduled partner needs: measured here (2 cores, load ~3.5), 8 batched streams fell
# to 14-27 tok/s in 3 of 5 runs with the default and stayed at 72-107 tok/s with 10,000;
# the best single-stream step was 7.7 ms either way. Set before llama.cpp (and libgomp)
# is loaded; an explicit GOMP_SPINCOUNT or OMP_WAIT_POLICY in the environment wins.
GOMP_SPINCOUNT = "10000"


def _load_backend(name: str, model_path: str, config: dict[str, Any]):
    if name == "llama":
        from node.backends.llama import LlamaBackend
        return LlamaBackend(model_path, config)
    if name == "whisper":
        from node.backends.whisper import WhisperBackend
        return WhisperBackend(model_path, config)
    if name == "piper":
        from node.backends.piper import PiperBackend
        return PiperBackend(model_path, config)
    raise SystemExit(f"unknown backend {name!r}")


# tokenize and detokenize share a queue: quick, and never behind a generation or an embedding
_QUEUE = {"tokenize": "tokens", "detokenize": "tokens"}


class WorkerServer:
    def __init__(self, framer: SyncFramer, backend) -> None:
        self.framer = framer
        self.backend = backend
        self.cancels: dict[int, threading.Event] = {}
        self.queues = {k: queue.Queue() for k in ("generate", "embed", "transcribe", "tokens",
                                                  "speak")}

    def run(self) -> None:
        for kind, q in self.queues.items():
            threading.Thread(target=self._drain, args=(kind, q), daemon=True,
                             name=f"worker-{kind}").start()
        while True:
            try:
                msg = self.framer.recv()
            except (OSError, FrameError):   # the parent went away (reset, cut frame)
                return
            if msg is None or msg.get("op") == "unload":
                return
            op, rid = msg.get("op"), msg.get("id")
            if op == "cancel":
                ev = self.cancels.get(msg.get("target"))
                if ev is not None:
                    ev.set()
            elif op == "stats":
                self.framer.send({"id": rid, "stats": self.backend.stats()})
            elif op == "run":
                try:
                    req = decode_request(msg.get("request"))
                except MeshError as exc:
                    self._send(rid, failed_from_error(exc))
                    continue
                self.cancels[rid] = threading.Event()
                self.queues[_QUEUE.get(req.kind, req.kind)].put((rid, req))
            else:
                self._send(rid, Failed(error="BadRequest", message=f"unknown op {op!r}",
                                       code="unknown_op"))

    def _drain(self, kind: str, q: queue.Queue) -> None:
        while True:
            rid, req = q.get()
            cancel = self.cancels.get(rid) or threading.Event()
            handed_off = False
            try:
                if cancel.is_set():
                    self._send(rid, Done(finish_reason="cancelled"))
                elif kind == "generate":
                    if not hasattr(self.backend, "submit"):
                        raise BadRequest("this model does not generate text",
                                         code="model_not_supported", param="model")
                    self.backend.submit(req, self._emitter(rid, whole=not req.stream), cancel)
                    handed_off = True  # it lives on in the backend; _emitter ends it
                elif kind == "tokens":
                    if not hasattr(self.backend, req.kind):
                        raise BadRequest(f"this model does not {req.kind} text",
                                         code="model_not_supported", param="model")
                    self._send(rid, Result(data=getattr(self.backend, req.kind)(req)))
                elif kind == "embed":
                    if not hasattr(self.backend, "embed"):
                        raise BadRequest("this model does not make embeddings",
                                         code="model_not_supported", param="model")
                    self._send(rid, Result(data=self.backend.embed(req)))
                elif kind == "speak":
                    if not hasattr(self.backend, "speak"):
                        raise BadRequest("this model does not synthesize speech",
                                         code="model_not_supported", param="model")
                    for ev in self.backend.speak(req, cancel):   # Audio... then Done
                        self._send(rid, ev)
                else:
                    if not hasattr(self.backend, "transcribe"):
                        raise BadRequest("this model does not transcribe audio",
                                         code="model_not_supported", param="model")
                    self._send(rid, Result(data=self.backend.transcribe(req)))
            except MeshError as exc:
                self._send(rid, failed_from_error(exc))
            except OSError:
                return  # the parent went away: nothing left to tell
            except Exception as exc:  # a backend bug: report it, keep serving
                traceback.print_exc()
                self._send(rid, Failed(error="BackendError", code="backend_error",
                                       message=f"{type(exc).__name__}: {exc}"))
            finally:
                if not handed_off:
                    self.cancels.pop(rid, None)

    def _emitter(self, rid: int, *, whole: bool = False):
        """Event sender for a request that finishes on another thread: its final event
        also forgets its cancel event. `whole` (Generate.stream false): Deltas are held
        and joined (mesh/wire/inference.py merged) and go out when one cannot be joined
        to the next, or before the final event: one frame for a plain answer, where a
        stream sends one per token."""
        held: Delta | None = None

        def send(ev) -> None:
            self.framer.send({"id": rid, "event": encode_event(ev)})

        def emit(ev) -> None:
            nonlocal held
            if isinstance(ev, TERMINAL):
                self.cancels.pop(rid, None)
            if whole:
                if held is not None:
                    both = merged(held, ev)
                    if both is None:
                        send(held)
                    else:
                        ev = both
                    held = None
                if isinstance(ev, Delta):
                    held = ev
                    return
            send(ev)
        return emit

    def _send(self, rid: int, ev) -> None:
        try:
            self.framer.send({"id": rid, "event": encode_event(ev)})
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="node.worker_main")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--backend", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--config", default="{}")
    args = ap.parse_args(argv)
    logging.basicConfig(level=os.environ.get("MESH_LOG_LEVEL", "INFO"),
                        format="worker %(levelname)s %(message)s", stream=sys.stderr)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(args.socket)
    framer = SyncFramer(sock)
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)
    try:
        backend = _load_backend(args.backend, args.model, json.loads(args.config))
    except Exception as exc:
        framer.send({"type": "fatal", "error": f"{type(exc).__name__}: {exc}"})
        return 1
    framer.send({"type": "ready", "info": backend.info(), "pid": os.getpid()})
    WorkerServer(framer, backend).run()
    # Skip interpreter teardown: native model destructors can be slow and the socket is gone.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
