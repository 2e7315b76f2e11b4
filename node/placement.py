"""Where the layers of a split model go: memory estimates and placement (pure functions).

Design notes
------------
Estimate. A llama.cpp model needs, on the node that holds a layer, that layer's weights
(the sizes of the GGUF's `blk.N.*` tensors, read from the file's header: tensor sizes are
the gaps between data offsets) and its share of the KV cache:

    kv_per_layer = n_ctx * (n_embd_k_gqa + n_embd_v_gqa) * KV_BYTES      (f16 cache)
    n_ctx        = context_size * parallel   (one KV stream per slot, node/backends/batching.py)
    n_embd_k_gqa = key_length * head_count_kv   (key_length defaults to n_embd / n_head)

The loading node also holds the token embeddings and the output layer (they stay on it:
node/rpc.py) and the compute buffers, logits included: `OVERHEAD` covers those. The
whole model is `weights + kv + OVERHEAD`; the weights are the file size when the header
cannot be read.

Slots. `parallel: auto` (the default) gives a model as many slots as ``AUTO_SLOTS``
whose KV cache (context_size cells each) fits in ``AUTO_SHARE`` of the free RAM, at least
one: 8 for every model of the gallery on a machine with a few GiB free, so 8 clients on
a default node are served at once instead of 4 running and 4 waiting. A slot that is not
used costs its cells' memory, no compute (the scheduler batches only running rows).
``slots(config, info, free)`` is the one rule; the worker and split placement use it.

Split or not. `split=False`: the model loads on this node alone (`Placement.local`),
whether or not the estimate fits (the caller decides what to do; the existing load path
never refused). `split=True` when the model fits here (within `local_free - RESERVE`, or
the node's `memory_limit`): refused with `Pointless`, whose message says why (every peer
computes on its CPU as this node would, so a split only adds a link round trip per peer
per token: exo users found splits slower than one node), unless `force`d; forced, every
eligible peer takes a part. When it does not fit here, the fewest best-ranked peers that
make it fit are used (every peer adds a hop per token).

Ranking peers. Only alive peers that lend memory (`rpc.offered > 0`) and whose RPC server
is not held by another node (`rpc.used_by`; llama.cpp's RPC server serves one client at
a time) are eligible. Their lent free memory (`rpc.free`, or all they offer when the
holder is this very node, which is about to release it) is weighted by the link, as
measured by a probe of the tunnel path (node/splits.py, mesh/tunnel.py `probe`; else the
gossip ping's RTT):

    score = free / (1 + rtt_ms / RTT_HALF_MS) * (1 if it holds the model file
                                                 else mbps / (mbps + MBPS_HALF))

A peer RTT_HALF_MS away counts half (the round trip is paid per token); a peer without
its own copy of the file counts by how fast the weights would reach it (MBPS_HALF MB/s
counts half; unknown: half), while one with the file fills its tensors from its own disk
(mesh/tunnel.py, FILL). Peers are taken best score first; `MAX_PEERS` caps it.

Layers. Each chosen node gets repeating layers in proportion to its capacity (free memory
for the loading node after its fixed part; lent free memory for peers) by largest
remainders, then layers are moved off any node over its capacity onto nodes with room.
The loading node's layers are the first ones (they run on its CPU before the RPC
devices), then the peers' in ranking order. A node may end with zero layers when its
share rounds to nothing; it is then dropped from the split.

First hop. When the chosen peers can hold every repeating layer, this node keeps none
(only the token embeddings and the output layer, which always stay here). llama.cpp's
scheduler puts the residual add that ends this node's last layer on the first RPC
device, so both of its operands (ffn_out and ffn_inp) crossed the first link every
token; with no layer here the first peer gets the token embeddings once. Measured with
SmolLM2 over two lenders: 11.6 KB per token with 10/10/10 layers, 9.3 KB with 0/15/15.

Left out on purpose: GPU layers on the loading node (this node's own layers run on its
CPU), per-layer size differences in the proportional step (sizes are averaged), and
bandwidth measurement beyond RTT.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

__all__ = ["ModelInfo", "PeerOffer", "NodeShare", "Placement", "CannotFit", "Pointless",
           "read_gguf", "tensor_table", "kv_shape", "model_info", "estimate", "place", "alone", "KV_BYTES",
           "OVERHEAD", "RTT_HALF_MS", "MBPS_HALF", "MAX_PEERS", "RESERVE", "AUTO_SLOTS", "AUTO_SHARE",
           "DEFAULT_CONTEXT", "slots"]

KV_BYTES = 2                     # f16 K and V cells (llama.cpp's default cache type)
OVERHEAD = 128 * 2**20           # compute buffers + logits + runtime on the loading node
PEER_OVERHEAD = 16 * 2**20       # compute buffer on an RPC server
RESERVE = 512 * 2**20            # RAM the loading node leaves to everything else
DEFAULT_CONTEXT = 2048           # cells per slot when the config names no context_size
AUTO_SLOTS = 8                   # parallel: auto, at most (module note: Slots)
AUTO_SHARE = 0.25                # ... and the share of free RAM their KV cache may take
RTT_HALF_MS = 10.0               # a peer this far away counts half its free memory
MBPS_HALF = 100.0                # MB/s at which a peer without the file counts half
MAX_PEERS = 8                    # below GGML_RPC_MAX_SERVERS (16); each adds a hop per token


class CannotFit(Exception):
    """No placement holds the model with the memory the mesh has."""


class Pointless(Exception):
    """A split was asked for a model that fits here: it would only be slower."""


# ----------------------------------------------------------------- GGUF header
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("truncated GGUF header")
    return struct.unpack(fmt, data)[0]


def _string(f: BinaryIO) -> str:
    n = _read(f, "<Q")
    if n > 1 << 24:
        raise ValueError("implausible GGUF string length")
    return f.read(n).decode("utf-8", errors="replace")


def _value(f: BinaryIO, vtype: int, keep: bool) -> Any:
    if vtype in _GGUF_SCALARS:
        return _read(f, _GGUF_SCALARS[vtype])
    if vtype == _GGUF_STRING:
        return _string(f)
    if vtype == _GGUF_ARRAY:
        etype, n = _read(f, "<I"), _read(f, "<Q")
        if etype in _GGUF_SCALARS:           # skip numeric arrays in one seek
            f.seek(n * struct.calcsize(_GGUF_SCALARS[etype]), os.SEEK_CUR)
            return None
        items = [_value(f, etype, keep) for _ in range(n)]
        return items if keep else None
    raise ValueError(f"unknown GGUF value type {vtype}")


def read_gguf(path: str) -> tuple[dict[str, Any], dict[str, int]]:
    """(scalar metadata, {tensor name: bytes}) from a GGUF file's header (v2/v3)."""
    meta, table = _read_gguf(path)
    return meta, {name: n for name, (_, n) in table.items()}


def tensor_table(path: str) -> dict[str, tuple[int, int]]:
    """{tensor name: (absolute file offset of its data, bytes up to the next tensor)}: what
    the RPC tunnel compares a weight upload with (mesh/tunnel.py, FILL)."""
    return _read_gguf(path)[1]


def _read_gguf(path: str) -> tuple[dict[str, Any], dict[str, tuple[int, int]]]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version = _read(f, "<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported")
        n_tensors, n_kv = _read(f, "<Q"), _read(f, "<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = _string(f)
            value = _value(f, _read(f, "<I"), keep=False)
            if value is not None:
                meta[key] = value
        offsets: list[tuple[int, str]] = []
        for _ in range(n_tensors):
            name = _string(f)
            n_dims = _read(f, "<I")
            f.seek(8 * n_dims + 4, os.SEEK_CUR)     # dims, type
            offsets.append((_read(f, "<Q"), name))
        align = int(meta.get("general.alignment", 32))
        data_start = (f.tell() + align - 1) // align * align
    offsets.sort()
    table: dict[str, tuple[int, int]] = {}
    for i, (off, name) in enumerate(offsets):
        end = offsets[i + 1][0] if i + 1 < len(offsets) else size - data_start
        table[name] = (data_start + off, max(0, end - off))
    return meta, table


# ------------------------------------------------------------------- estimate
@dataclass(frozen=True)
class ModelInfo:
    """What placement needs to know about a model file."""
    n_layer: int
    layer_bytes: tuple[int, ...]        # weights of each repeating layer
    fixed_bytes: int                    # token embeddings, output layer, other non-layer tensors
    kv_per_layer_token: int             # (n_embd_k_gqa + n_embd_v_gqa) * KV_BYTES

    @property
    def weights(self) -> int:
        return sum(self.layer_bytes) + self.fixed_bytes


def kv_shape(meta: dict[str, Any]) -> tuple[int, int]:
    """(layers, KV bytes per layer per cell) from GGUF metadata: a header read here, or a
    loaded model's `metadata()` (llama.cpp gives every value as a string)."""
    arch = meta.get("general.architecture", "llama")
    n_layer = int(meta[f"{arch}.block_count"])
    n_embd = int(meta[f"{arch}.embedding_length"])
    n_head = int(meta.get(f"{arch}.attention.head_count") or 1)
    n_head_kv = int(meta.get(f"{arch}.attention.head_count_kv") or n_head)
    k_len = int(meta.get(f"{arch}.attention.key_length") or n_embd // n_head)
    v_len = int(meta.get(f"{arch}.attention.value_length") or n_embd // n_head)
    return n_layer, (k_len + v_len) * n_head_kv * KV_BYTES


def model_info(path: str) -> ModelInfo:
    """Read a GGUF's layer count, per-layer weights and KV width."""
    meta, sizes = read_gguf(path)
    n_layer, kv = kv_shape(meta)
    layers = [0] * n_layer
    fixed = 0
    for name, nbytes in sizes.items():
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) > 1 and parts[1].isdigit() and int(parts[1]) < n_layer:
            layers[int(parts[1])] += nbytes
        else:
            fixed += nbytes
    return ModelInfo(n_layer=n_layer, layer_bytes=tuple(layers), fixed_bytes=fixed,
                     kv_per_layer_token=kv)


def slots(config: dict[str, Any], info: ModelInfo | tuple[int, int], free: int) -> int:
    """The model's slot count: its `parallel`, or for "auto" (or none) the rule of the
    module note (Slots). `info`: the model's ModelInfo or its `kv_shape`."""
    p = config.get("parallel")
    if p not in (None, "auto"):
        return max(1, int(p))
    n_layer, kv = (info.n_layer, info.kv_per_layer_token) if isinstance(info, ModelInfo) else info
    per_slot = n_layer * int(config.get("context_size") or DEFAULT_CONTEXT) * kv
    return max(1, min(AUTO_SLOTS, int(free * AUTO_SHARE) // max(per_slot, 1)))


def estimate(info: ModelInfo, n_ctx: int) -> int:
    """Bytes the whole model needs with `n_ctx` KV cells (context_size * parallel)."""
    return info.weights + info.n_layer * n_ctx * info.kv_per_layer_token + OVERHEAD


# ------------------------------------------------------------------ placement
@dataclass(frozen=True)
class PeerOffer:
    """A peer as placement sees it (from its gossiped NodeState and our RTT)."""
    peer_id: str
    name: str
    offered: int
    free: int
    used_by: str = ""
    alive: bool = True
    rtt_ms: float | None = None
    mbps: float | None = None        # measured throughput of the tunnel path
    has_file: bool = False           # it holds the model file (fills its tensors itself)


@dataclass(frozen=True)
class NodeShare:
    peer_id: str                 # "" for the loading node
    name: str
    layers: int
    bytes: int                   # estimated bytes this node holds


@dataclass(frozen=True)
class Placement:
    shares: tuple[NodeShare, ...]          # loading node first, then peers in layer order
    need: int                              # the whole model's estimate

    @property
    def split(self) -> bool:
        return len(self.shares) > 1

    @property
    def peers(self) -> tuple[NodeShare, ...]:
        return tuple(s for s in self.shares if s.peer_id)

    def describe(self) -> dict[str, Any]:
        total = sum(s.layers for s in self.shares) or 1
        return {"nodes": [s.name for s in self.shares],
                "layers": [s.layers for s in self.shares],
                "tensor_split": [round(s.layers / total, 4) for s in self.shares],
                "bytes": [s.bytes for s in self.shares]}


def _score(p: PeerOffer, me: str) -> float:
    free = p.offered if p.used_by == me else p.free
    rtt = p.rtt_ms if p.rtt_ms is not None and math.isfinite(p.rtt_ms) else RTT_HALF_MS
    link = 1.0 if p.has_file else (
        0.5 if p.mbps is None or not math.isfinite(p.mbps) else max(0.0, p.mbps) / (max(0.0, p.mbps) + MBPS_HALF))
    return free / (1.0 + max(0.0, rtt) / RTT_HALF_MS) * link


def eligible(peers: list[PeerOffer], me: str, exclude: frozenset[str] = frozenset()) -> list[PeerOffer]:
    """Peers that can take layers, best first."""
    ok = [p for p in peers if p.alive and p.offered > 0 and p.peer_id not in exclude
          and p.used_by in ("", me)]
    ok = [p for p in ok if (p.offered if p.used_by == me else p.free) > PEER_OVERHEAD]
    return sorted(ok, key=lambda p: (-_score(p, me), p.name, p.peer_id))


def _apportion(n: int, caps: list[float]) -> list[int]:
    """n items in proportion to caps, by largest remainders."""
    total = sum(caps)
    if total <= 0:
        return [0] * len(caps)
    exact = [n * c / total for c in caps]
    out = [int(math.floor(x)) for x in exact]
    order = sorted(range(len(caps)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[: n - sum(out)]:
        out[i] += 1
    return out


def alone(info: ModelInfo, *, n_ctx: int, my_name: str = "local") -> Placement:
    """The whole model on this node."""
    need = estimate(info, n_ctx)
    return Placement((NodeShare("", my_name, info.n_layer, need),), need)


def place(info: ModelInfo, *, n_ctx: int, local_free: int, peers: list[PeerOffer],
          split: bool, me: str = "", my_name: str = "local",
          exclude: frozenset[str] = frozenset(), local_limit: int = 0,
          force: bool = False) -> Placement:
    """Where each layer goes (see the module note). Raises CannotFit, Pointless."""
    need = estimate(info, n_ctx)
    per_layer = [b + n_ctx * info.kv_per_layer_token for b in info.layer_bytes]
    avg = sum(per_layer) / max(1, info.n_layer)
    local_fixed = info.fixed_bytes + OVERHEAD
    budget = max(0, local_free - RESERVE)
    if local_limit > 0:
        budget = min(budget, local_limit)
    local_cap = max(0, budget - local_fixed)
    if not split:
        return alone(info, n_ctx=n_ctx, my_name=my_name)
    cands = eligible(peers, me, exclude)
    free_of = {p.peer_id: (p.offered if p.used_by == me else p.free) - PEER_OVERHEAD for p in cands}
    if need <= budget and not force:
        raise Pointless(
            f"it fits on this node ({_gib(need)} needed, {_gib(budget)} free here), and every "
            f"lender computes on its CPU as this node would, so a split over "
            f"{len(cands) or 'any'} peer(s) would only add a link round trip per peer per token "
            f"({_rtts(cands)}): load it without split, or force the split")
    if need <= budget:
        chosen = cands[:MAX_PEERS]
    else:
        chosen, room = [], local_cap
        for p in cands[:MAX_PEERS]:
            if room >= sum(per_layer):
                break
            chosen.append(p)
            room += free_of[p.peer_id]
    caps = [float(local_cap)] + [float(free_of[p.peer_id]) for p in chosen]
    if sum(caps[1:]) >= sum(per_layer):
        caps[0] = 0.0       # the peers hold every layer: see "First hop" in the note
    if sum(caps) < sum(per_layer):
        raise CannotFit(
            f"the model needs about {_gib(need)} ({info.n_layer} layers of ~{_gib(avg)}); "
            f"this node has {_gib(budget)} free and "
            f"{len(cands)} peer(s) lend {_gib(sum(free_of.values()))}")
    counts = _apportion(info.n_layer, caps)
    # move layers off nodes over capacity onto nodes with room (largest room first)
    for _ in range(info.n_layer * len(caps)):
        over = [i for i, c in enumerate(counts) if c * avg > caps[i] and c > 0]
        if not over:
            break
        room = [i for i, c in enumerate(counts) if (c + 1) * avg <= caps[i]]
        if not room:
            raise CannotFit(f"the model's {info.n_layer} layers do not fit the memory "
                            f"offered in whole layers (~{_gib(avg)} each)")
        counts[over[0]] -= 1
        counts[max(room, key=lambda i: caps[i] - counts[i] * avg)] += 1
    if split and len(chosen) and sum(counts[1:]) == 0:
        # the user asked for a split: give the best peer one layer rather than none
        counts[0] -= 1
        counts[1] += 1
    names = [("", my_name)] + [(p.peer_id, p.name) for p in chosen]
    shares, first = [], 0
    for (pid, name), c in zip(names, counts):
        if c == 0 and pid:
            continue
        nbytes = int(sum(per_layer[first:first + c]))
        if not pid:
            nbytes += local_fixed
        else:
            nbytes += PEER_OVERHEAD
        shares.append(NodeShare(pid, name, c, nbytes))
        first += c
    return Placement(tuple(shares), need)


def _rtts(peers: list[PeerOffer]) -> str:
    known = [p for p in peers if p.rtt_ms is not None and math.isfinite(p.rtt_ms)]
    if not known:
        return "round trips not measured"
    return ", ".join(f"{p.name} {p.rtt_ms:.2f} ms" for p in known)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"
