"""`mesh up`: one trio nursery holding the worker pool, the mesh and the HTTP API.

Start-up order (each step `nursery.start`-ed, so the next one sees it ready):
  1. resolve the models to serve against the gallery (an unknown id fails at once);
  2. the worker pool;
  3. Hypercorn serving the Quart app (port 0 picks a free port); the node prints
     `mesh: api http://HOST:PORT/v1` on stdout;
  4. in the background: install missing models (gallery), load them; `/readyz` turns 200
     and the node prints `mesh: ready` once every model is loaded.

Shutdown (Ctrl-C, SIGTERM): Hypercorn stops accepting, open requests get
SHUTDOWN_GRACE seconds, then everything left is cancelled, streams included (a client
that stops reading would otherwise hold Hypercorn forever), and the worker processes
are terminated. The whole takes < 5 s.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from api.app import create_app
from api.common import BACKGROUND, ON_BEHALF
from api.lines import answer
from gallery.catalog import load_index, resolve
from gallery.installer import install
from gallery.store import Store
from mesh.bulk import BulkServer
from mesh.errors import AuthError, MeshError, PermissionDenied
from mesh.files import PEER_SETTLE_S
from mesh.files import PROTOCOL as FILES_PROTOCOL, make_handler as make_files_handler
from mesh.keys import InFlight, KeyRing
from mesh.nodes import NodeBook
from mesh.p2p import open_p2p
from mesh.peers import MeshPeers
from mesh.proxy import PROTOCOL as PROXY_PROTOCOL, ProxyClient, make_handler as make_proxy_handler
from mesh.records import PROTOCOL as RECORDS_PROTOCOL, RecordClient
from mesh.records import make_handler as make_records_handler
from mesh.router import Router
from mesh.token import parse_token, resolve_secrets, store_secrets
from mesh.tunnel import PROTOCOL as RPC_PROTOCOL, make_handler as make_rpc_handler
from mesh.wire.inference import feature_of
from node.agents import Agents, AgentStore, NodeTools
from node.batches import KIND as BATCH_KIND, Batches
from node.config import NodeConfig
from node.jobs import Jobs
from node.keepalive import KeepAlive
from node.local import LocalModels
from node.metrics import NodeMetrics
from node.responses import KIND as RESPONSE_KIND, ResponseStore
from node.rpc_server import RpcServer
from node.services import Services, say, spec_for
from node.splits import Splits
from node.uploads import CONTENT_KIND as FILE_CONTENT_KIND, KIND as FILE_KIND, FileStore
from node.workers import WorkerPool

log = logging.getLogger("node.daemon")

OPEN_WARNING = ("the API listens on %s, beyond loopback, and the mesh has no API key: anyone "
                "who can reach it can use it (create one with `mesh keys create`)")
SHUTDOWN_GRACE = 2.0     # seconds open requests get after Ctrl-C; workers get 2 s more


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _install_and_load(svc: Services, names: list[str]) -> None:
    """Install what is missing, then load every model; failures are reported, not fatal."""
    for name in names:
        try:
            installed = svc.store.get(name)
            if installed is None:
                entry = resolve(svc.index, name)
                say(f"installing {entry.id} from the gallery")
                last = [0.0]

                def progress(p, _last=last):
                    now = time.monotonic()
                    if p.state in ("done", "failed") or now - _last[0] > 5:
                        _last[0] = now
                        log.info("install %s: %s %s/%s bytes", p.id, p.state, p.bytes_done,
                                 p.bytes_total)

                installed = await install(entry, svc.store, progress=progress,
                                          peer_fetchers=svc.peer_fetchers(PEER_SETTLE_S))
            await svc.pool.load(spec_for(installed), wait=True)
            log.info("loaded %s", installed.id)
        except MeshError as exc:
            svc.startup_error = f"{name}: {exc.message}"
            say(f"error: {svc.startup_error}")
            return
    ready, _ = svc.readiness()
    if ready:
        say(f"ready ({', '.join(svc.wanted) or 'no models'})")


async def serve_node(config: NodeConfig, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run one node until cancelled or signalled."""

    config.home.mkdir(parents=True, exist_ok=True)
    os.chmod(config.home, 0o700)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    token = parse_token(config.token) if config.token else None
    store = Store(config.models_path)
    index = load_index(config.gallery)
    names = [] if config.no_models else list(config.models)
    wanted = []
    for name in names:               # unknown ids fail before anything starts
        installed = store.get(name)
        wanted.append(installed.id if installed else resolve(index, name).id)

    responses = ResponseStore(config.home / "responses.db",
                              retention_days=config.response_retention_days)
    agent_store = AgentStore(config.home / "agents.db")
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(responses.close)      # after the nursery: requests in grace still store
        stack.callback(agent_store.close)    # after the nursery: runs record how they ended
        nursery = await stack.enter_async_context(trio.open_nursery())
        pool = WorkerPool(config.run_dir, max_queue=config.max_queue)
        await nursery.start(pool.serve)
        metrics = NodeMetrics(pool)
        router = Router(local=metrics.local(LocalModels(pool)), request_timeout=config.request_timeout,
                        queue_timeout=config.queue_timeout or None, affinity=config.affinity)
        svc = Services(config=config, node_name=config.name, pool=pool, router=router,
                       store=store, index=index, metrics=metrics, wanted=wanted,
                       keyring=KeyRing(config.home),
                       in_flight=InFlight(config.max_concurrent_per_key))
        metrics.state = svc.node_state
        pool.on_change = svc.notify_changed
        svc.responses = responses
        svc.jobs = await nursery.start(Jobs(store, peer_fetchers=svc.peer_fetchers,
                                            after_install=svc.load_model).serve)
        svc.keepalive = await nursery.start(KeepAlive(pool, store, unload=svc.unload_model,
                                                      on_change=svc.notify_changed).serve)
        app = create_app(svc)
        svc.files = FileStore(config.home / "files")
        stack.callback(svc.files.close)
        svc.batches = _batches(svc, app, config)
        stack.callback(svc.batches.close)
        svc.agents = _agents(svc, config, agent_store)

        shutdown = trio.Event()
        if token is not None:
            secrets, note = resolve_secrets(config.home, token)
            if note:
                say(note)
            p2p = await stack.enter_async_context(open_p2p(
                home=config.home, token=secrets, name=config.name, listen_host=config.host,
                p2p_port=config.p2p_port, peers=config.peers, mdns=config.mdns,
                state=lambda: _gossiped(svc), on_rotated=lambda s: store_secrets(config.home, s)))
            svc.keyring.node_id = p2p.peer_id
            svc.nodes = NodeBook(config.home, p2p.peer_id)
            p2p.first_seen = svc.nodes.first_seen
            svc.nodes.seen(p2p.peer_id, config.name)
            await p2p.revoke(svc.nodes.revoked())
            svc.p2p = p2p
            router.peers = MeshPeers(p2p.view)
            router.transport = metrics.transport(ProxyClient(p2p))
            metrics.view = p2p.view
            bulk_server = None             # mesh/bulk.py: proxied events, files, RPC off libp2p
            if config.bulk_port >= 0:
                bulk_server = await nursery.start(BulkServer(
                    host=config.host, port=config.bulk_port, peer_id=p2p.peer_id).serve)
            p2p.set_handler(PROXY_PROTOCOL, metrics.inbound(make_proxy_handler(
                router, authorize=_authorizer(svc.keyring), max_deadline=config.request_timeout,
                in_flight=svc.in_flight, bulk_server=bulk_server)))
            if config.offer_memory > 0:
                svc.rpc = RpcServer(home=config.home, offered=config.offer_memory,
                                    threads=config.rpc_threads, on_change=svc.notify_changed)
                await nursery.start(svc.rpc.serve)
            p2p.set_handler(RPC_PROTOCOL, make_rpc_handler(svc.rpc, bulk_server=bulk_server,
                                                           find_file=store.find_file_by_sha256))
            svc.splits = await nursery.start(Splits(pool=pool, p2p=p2p, threads=config.rpc_threads,
                                                    memory_limit=config.memory_limit,
                                                    stopping=shutdown.is_set).serve)
            p2p.set_handler(FILES_PROTOCOL, make_files_handler(store.find_file_by_sha256,
                                                               store.models_dir,
                                                               bulk_server=bulk_server))
            responses.join(p2p.peer_id, RecordClient(p2p))
            svc.files.join(p2p.peer_id, RecordClient(p2p))
            svc.batches.join(p2p.peer_id, RecordClient(p2p))
            svc.agents.join(p2p)
            p2p.set_handler(RECORDS_PROTOCOL, make_records_handler({
                RESPONSE_KIND: responses, FILE_KIND: svc.files,
                FILE_CONTENT_KIND: FileStore.Content(svc.files), BATCH_KIND: svc.batches,
                **svc.agents.record_sources()}))
            nursery.start_soon(_merge_gossiped_keys, svc)
            nursery.start_soon(_merge_gossiped_nodes, svc)
            for addr in p2p.addrs:
                say(f"p2p {addr}")

        hc = HypercornConfig()
        hc.bind = [_bind(config.host, config.port)]
        hc.backlog = 1024
        hc.graceful_timeout = SHUTDOWN_GRACE
        hc.accesslog = None
        hc.errorlog = logging.getLogger("hypercorn.error")
        binds = await nursery.start(lambda task_status: hypercorn_serve(
            app, hc, shutdown_trigger=shutdown.wait, task_status=task_status))
        url = (binds[0] if binds else f"http://{_bind(config.host, config.port)}").rstrip("/")
        svc.api_url = url
        say(f"api {url}/v1")
        if svc.is_open():
            log.warning(OPEN_WARNING, config.host)
        nursery.start_soon(_install_and_load, svc, wanted)
        await nursery.start(svc.batches.serve)
        await nursery.start(svc.agents.serve)
        task_status.started(svc)

        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                say(f"{signal.Signals(signum).name}: shutting down")
                break
        shutdown.set()
        # Open requests get the grace period; then everything is cancelled.
        nursery.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE + 0.5
        for w in pool.workers.values():
            w.stop()


def _batches(svc: Services, app, config: NodeConfig) -> Batches:
    """The Batch API's runner: lines go through the OpenAI adapter (`answer`) in the app's
    context, so they are validated, routed and answered exactly as over HTTP."""
    router, keyring = svc.router, svc.keyring

    async def run_line(endpoint: str, body: dict, caller) -> tuple[int, dict]:
        async with app.app_context():
            ON_BEHALF.set(caller)       # this task runs as the batch's key...
            BACKGROUND.set(True)        # ...and its generations as background work
            return await answer(endpoint, body)

    def check_model(model: str, endpoint: str) -> None:
        router.plan(model, kind="embed" if endpoint == "/v1/embeddings" else "generate")

    def authorized(caller) -> bool:
        return not keyring.enforcing or bool(caller) and any(
            r.key_id == caller.get("key_id") for r in keyring.live())

    return Batches(config.home / "batches.db", svc.files, run_line=run_line,
                   capacity=router.capacity, check_model=check_model, authorized=authorized,
                   max_active_per_key=config.batch_max_active,
                   max_lines=config.batch_max_lines)


def _agents(svc: Services, config: NodeConfig, store: AgentStore) -> Agents:
    """Agents (node/agents): their model calls go through the router as the agent's key;
    what they may use on this node is the node's own configuration."""
    tools = NodeTools(mcp_servers=dict(config.mcp_servers),
                      read_dirs=tuple(os.path.realpath(d) for d in config.agent_read_dirs),
                      http_prefixes=tuple(config.agent_http_prefixes))
    return Agents(store, router=svc.router, keyring=svc.keyring, node_name=config.name,
                  tools=tools, token_cap=config.max_tokens_limit,
                  notify_changed=svc.notify_changed)


def _gossiped(svc: Services):
    """What this node gossips: its NodeState, plus the agents' entry of `extra`."""
    state = svc.node_state()
    nodes = {"nodes": svc.nodes.wire()} if svc.nodes is not None and svc.nodes.wire() else {}
    return state.model_copy(update={"extra": {**state.extra, **svc.agents.gossip(), **nodes}})


def _authorizer(keyring: KeyRing):
    """The proxy's check of a peer-forwarded request: the caller the origin authenticated
    must hold the request's feature in our own copy of the key ring."""

    def authorize(caller, request) -> None:
        if not keyring.enforcing:
            return
        if not caller:
            raise AuthError("the forwarding node sent no caller identity")
        # the key as OUR ring knows it: a revoked or unknown key id, or features the
        # forwarding node merely claims, are not taken on trust
        rec = next((r for r in keyring.live() if r.key_id == caller.get("key_id")), None)
        if rec is None:
            raise AuthError("the caller's API key is unknown or revoked on the serving node",
                            code="invalid_api_key")
        need = feature_of(request)
        features = rec.features
        if "admin" not in features and need not in features:
            raise PermissionDenied(f"this API key does not have the '{need}' feature",
                                   code="feature_not_granted")

    return authorize


async def _merge_gossiped_nodes(svc: Services) -> None:
    """Note every peer seen; fold in the node revocations peers gossip, drop and refuse
    the revoked at once (mesh/nodes.py); re-gossip when our book changed."""
    view, book = svc.p2p.view, svc.nodes
    merged_seq: dict[str, int] = {}
    while True:
        changed = view.changed
        merged = False
        for peer in _fresh_states(view, merged_seq):
            if peer.peer_id not in book.revoked():
                book.seen(peer.peer_id, peer.name)
            raw = (peer.state.extra or {}).get("nodes") if peer.state else None
            if isinstance(raw, list):
                try:
                    merged |= book.merge(raw)
                except ValueError as exc:   # pydantic: a malformed record from a peer
                    log.warning("ignored bad node records from %s: %s", peer.name, exc)
        if merged:
            await svc.p2p.revoke(book.revoked())
            svc.notify_changed()
        await changed.wait()


def _fresh_states(view, last_seq: dict[str, int]) -> list:
    """The peers whose gossiped state is new since the last call (by its seq), so a view
    change costs one merge per new message, not one per peer: at 1,000 nodes re-merging
    every peer's records on every change took 148% of a core (docs/scale.md)."""
    out = []
    for peer in view.peers():
        if peer.state is not None and last_seq.get(peer.peer_id) != peer.state.seq:
            last_seq[peer.peer_id] = peer.state.seq
            out.append(peer)
    return out


async def _merge_gossiped_keys(svc: Services) -> None:
    """Fold the key records peers gossip into ours; re-gossip when ours changed."""
    view = svc.p2p.view
    merged_seq: dict[str, int] = {}
    while True:
        changed = view.changed
        merged = False
        for peer in _fresh_states(view, merged_seq):
            if peer.state.keys:
                try:
                    merged |= svc.keyring.merge(peer.state.keys)
                except ValueError as exc:   # pydantic: a malformed record from a peer
                    log.warning("ignored bad key records from %s: %s", peer.name, exc)
        if merged:
            svc.notify_changed()
        await changed.wait()
