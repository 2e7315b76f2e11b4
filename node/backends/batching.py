"""Continuous batching for llama.cpp: N slots, one scheduler thread, one batch per step.

Design notes
------------
The KV cache. One llama context holds `parallel` sequences (seq_id 0..N-1, one per slot)
in a *split* cache, llama-server's default: n_ctx = context_size * parallel and
`kv_unified = False`, so each sequence owns a stream of exactly `context_size` cells. A
request can never run out of room because its neighbours are long (its limit is checked
at admission), a finished slot's cells cost nobody anything (they stay as its prompt
cache), and attention reads only the sequence's own stream. A unified cache makes every
token's attention walk all slots' cells under a mask: measured here (8 slots holding 700
tokens each, one token per slot) a step took 97 ms unified vs 75 ms split. The split
cache has one catch: llama.cpp puts only runs of *consecutive* seq_ids into one ubatch
(`split_equal(sequential=true)`), so busy slots {0, 2, 4, 6} cost four forward passes
(42 ms vs 30 ms for {0, 1, 2, 3}). Hence rows go into the batch in seq_id order, and a
new request prefers a slot that keeps the busy slots contiguous (below).

A step. The scheduler thread loops:
  1. reap: a request whose cancel event is set leaves (finish_reason "cancelled"), queued
     or running; its slot is free for this very step. A queued request older than its
     `max_wait` (Generate.max_wait, 30 s by default) leaves with Failed(Unavailable,
     queue_timeout): the router tries another node, or the client gets a 503;
  2. admit: queued requests take free slots (see prompt cache): interactive ones first
     come first served, then background ones (batch lines, Generate.background), which
     never take the last free slot, so an interactive request arriving during a batch
     finds one (a single-slot model has no slot to keep: there they queue as the rest),
     and sit out the steps that read an interactive prompt;
  3. build ONE `llama_batch`, rows in seq_id order: the last sampled token of every
     generating sequence (one token each, logits on) and prompt tokens of admitted
     requests, handed out oldest request first up to a prefill budget (PREFILL_CHUNK while anything is generating, the whole n_batch
     when nothing is), so a long prompt is eaten over several steps while the running
     streams keep producing a token per step. Logits are asked for a prompt only on the
     step that feeds its last token;
  4. `llama_decode` (releases the GIL: the worker's reader thread keeps answering
     `cancel`/`stats` meanwhile). A step that holds only background rows is aborted
     when an interactive request is submitted during it (llama.cpp's abort callback,
     polled between the graph's nodes): its cells are removed, nothing counts as fed,
     and the next step reads the interactive prompt, so a chat sent during a batch
     waits for no batch step (one 7-row step of SmolLM2 on one core is ~100 ms);
  5. for every row with logits, the request's own sampler chain picks a token
     (`llama_sampler_sample(chain, ctx, row)`), which is turned into text and checked
     against EOG, stop strings and max_tokens. A request that is done sends its `done`
     frame and frees its slot; the next step admits whoever waits.
The thread sleeps on a condition variable when no request is queued or running.

Sampling. Each request gets its own llama.cpp sampler chain: penalties (last
PENALTY_LAST_N tokens, prompt included, like llama-server) -> greedy when temperature
is 0, else top_k -> top_p -> min_p -> temp -> dist(seed). The same order as
llama-cpp-python's `Llama._init_sampler`, so a seed means the same thing as before.
Plain greedy (temperature 0, no penalties) takes numpy's argmax of the row's logits
instead: the same token (first maximum, as llama.cpp's greedy sampler), 24 us instead of
117 us per row here, ~2% of a step at 8 rows.
Constrained rows (`response_format`, forced tool calls) carry a grammar sampler
(llama.cpp's GBNF engine; parsed once per schema in the backend, cloned per request), so
a constrained and a free request share one batch. They sample as llama.cpp's common
sampler does: the free chain picks a token, the grammar checks just that token, and only
when it refuses is the grammar applied to the whole vocabulary (it walks every token's
text) before the chain samples again. Such rows never
take the argmax shortcut.

Logprobs, when asked: the log-softmax of the row's raw logits (the model's distribution,
before temperature or top-k), the sampled token's value and the n most likely tokens;
they ride on the next Delta (a token's text may be held back a while).

Rows of one batch do not influence each other's logits (on this CPU build the results
are bit-identical), so greedy text is the same batched or alone (tests/test_batching.py
checks it through the API).

Text. Token pieces are bytes; an incremental UTF-8 decoder holds a partial multibyte
character until the next token completes it. Stop strings: text that could still be the
start of a stop string is held back (the longest suffix that is a prefix of a stop), so a
stop string never leaks, not even partly; at the end the held text is released.

Prompt cache. A slot remembers the tokens whose KV its sequence holds (prompt plus the
generated tokens that were fed back). A new request goes to the FREE slot whose cache
shares the longest prefix with its prompt; ties (often just a shared system prompt) go to
the slot that leaves the fewest runs of consecutive busy slots, then to the least
recently used one, so that recent conversations keep their cache longer. Cells past the
common prefix are removed (`llama_memory_seq_rm(seq, n_keep, -1)`) and only the suffix
is evaluated; at least the last prompt token is always re-evaluated, since its logits
are needed. A background job (a batch line) never takes the free slot an interactive job
used last while another is free: since it never takes the last free slot either, the
slot a batch leaves free is that one, and the next turn of the latest conversation finds
its prompt there (else a chat sent during a batch met a slot full of batch lines and
read its whole prompt again). `usage.prompt_tokens_details.cached_tokens` = n_keep. A
request that ends normally or is cancelled leaves its cells in place (they are its
slot's cache; in a split cache no other sequence could use them); a failed decode
clears the sequence.

Pacing. A stream's text goes out at most every `stream_interval_ms` (model config, 20 ms
by default; 0 sends every token as it comes), as vLLM's and SGLang's `stream_interval` do
by token count: each event sent costs a frame here, a wake-up and an SSE write in the
node, a proxy frame and a wake-up of the client, all on the cores that decode. The first
Delta always goes at once (time to first token is untouched); a later one that comes
within the interval of the last one sent is held and joined to the next (mesh/wire/
inference.py merged: text and logprobs, never tool calls), and any other event (Done,
Failed, a Delta that cannot be joined) sends what is held first. No timer: held text
goes with the job's first token after its interval is over, so it waits at most the
interval plus one step; a step that reads a prompt may take far longer than a token's
step, so before one everything held goes, and so does the text of a job that sits a step
out once its interval is over. A non-streaming request is not paced (the worker joins
its Deltas anyway).

Choices (n > 1). A request with n choices is one Job per choice: the first (the parent)
takes the best slot as above; the others take free slots at the same time (admission
waits until n slots are free, first come first served) and feed nothing. On the step
where the parent's last prompt token has its logits, each choice's sequence gets a copy
of the parent's cells (`llama_memory_seq_cp`, split cache: the stream is copied before
the next decode) and samples its first token from the parent's row with its own chain
(seed + i). From there the choices are ordinary rows. `Choices` merges their events into
one stream (Delta.index; a choice's end is a Delta with its finish_reason; one Done).

Left out on purpose
- Context shift / truncation: a prompt that does not fit its slot is refused (400
  context_length_exceeded), and generation stops at the slot's end ("length").
- Prefix sharing between unrelated requests (seq_cp from a busy slot) and a unified
  cache: with kv_unified each sequence's attention spans every slot's cells, slower here.
- Cost-aware slot choice (llama-server's similarity threshold, LRU by cache size),
  speculative decoding, n > 1.
- Preemption of slots: a running request keeps its slot until it ends (only a step of
  batch lines is cut short, above); the queue is FCFS and unbounded here (the node caps
  it with max_queue before it gets here).
"""

from __future__ import annotations

import codecs
import collections
import ctypes
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import llama_cpp
import numpy as np

from mesh.wire.inference import Delta, Done, Failed, TokenLogprob, TopLogprob, Usage, merged
from node.backends import tools

log = logging.getLogger("node.backends.batching")

_LIBC = ctypes.CDLL(None)    # the process's own libc: strlen is the abort callback

Emit = Callable[[Any], None]     # takes a Delta | Done | Failed (mesh/wire/inference.py)

PREFILL_CHUNK = 128        # prompt tokens per step while others generate: ~0.5 s for the
                           # 135M Q4_1 model on the 2-core test machine (~4 ms/token, no
                           # GEMM speed-up on this CPU), so a running stream stalls at most
                           # that long per step while a long prompt is eaten
PENALTY_LAST_N = 64        # llama-cpp-python's last_n_tokens_size default
HOLD_EWMA = 0.2           # weight of the latest ended request in the mean slot hold time
TPS_WINDOW_S = 10.0        # tokens_per_s: tokens / time of the decode-only steps (no
                           # prompt tokens in the batch) of the last 10 s
RANDOM_SEED = 0xFFFFFFFF   # LLAMA_DEFAULT_SEED: llama.cpp draws a random seed


@dataclass
class Sampling:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    seed: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()

    @classmethod
    def from_params(cls, p: dict[str, Any]) -> "Sampling":
        d = cls()
        return cls(
            temperature=float(p.get("temperature", d.temperature)),
            top_p=float(p.get("top_p", d.top_p)), top_k=int(p.get("top_k", d.top_k)),
            min_p=float(p.get("min_p", d.min_p)),
            presence_penalty=float(p.get("presence_penalty", d.presence_penalty)),
            frequency_penalty=float(p.get("frequency_penalty", d.frequency_penalty)),
            repeat_penalty=float(p.get("repeat_penalty", d.repeat_penalty)),
            seed=None if p.get("seed") is None else int(p["seed"]),
            logit_bias=tuple((int(t), float(b)) for t, b in p.get("logit_bias") or ()))

    def chain(self, n_vocab: int) -> llama_cpp.llama_sampler_p:
        """A new llama.cpp sampler chain (free with llama_sampler_free)."""
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = lambda s: llama_cpp.llama_sampler_chain_add(chain, s)  # noqa: E731
        if self.penalised:
            add(llama_cpp.llama_sampler_init_penalties(
                n_vocab, PENALTY_LAST_N, self.repeat_penalty, self.frequency_penalty,
                self.presence_penalty))
        if self.logit_bias:
            arr = (llama_cpp.llama_logit_bias * len(self.logit_bias))(
                *[llama_cpp.llama_logit_bias(token=t, bias=b) for t, b in self.logit_bias])
            add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(self.logit_bias), arr))
        if self.temperature <= 0:
            add(llama_cpp.llama_sampler_init_greedy())
            return chain
        if self.top_k > 0:
            add(llama_cpp.llama_sampler_init_top_k(self.top_k))
        if self.top_p < 1.0:
            add(llama_cpp.llama_sampler_init_top_p(self.top_p, 1))
        if self.min_p > 0.0:
            add(llama_cpp.llama_sampler_init_min_p(self.min_p, 1))
        add(llama_cpp.llama_sampler_init_temp(self.temperature))
        seed = RANDOM_SEED if self.seed is None else self.seed & 0xFFFFFFFF
        add(llama_cpp.llama_sampler_init_dist(seed))
        return chain

    @property
    def greedy(self) -> bool:
        """Plain argmax: the scheduler skips the chain (same token, 1/5 of the time)."""
        return self.temperature <= 0 and not self.penalised and not self.logit_bias

    @property
    def penalised(self) -> bool:
        return (self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0
                or self.presence_penalty != 0.0)


class TextStream:
    """Bytes of token pieces in, text safe to show out: whole UTF-8 characters only, and
    nothing that could turn out to be the start of a stop string."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        self.matched: str | None = None      # the stop string that ended the text

    def push(self, data: bytes, *, final: bool = False) -> tuple[str, bool]:
        """Add bytes; return (text to emit now, whether a stop string was reached).
        With final=True everything still held is released (unless it holds a stop)."""
        held = self._held + self._decoder.decode(data, final)
        found = [(i, s) for s in self.stops if (i := held.find(s)) >= 0]
        if found:
            cut, self.matched = min(found, key=lambda f: f[0])
            self._held = ""
            return held[:cut], True
        if final:
            self._held = ""
            return held, False
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(held)), keep, -1):
                if held.endswith(s[:k]):
                    keep = k
                    break
        self._held = held[len(held) - keep:] if keep else ""
        return held[:len(held) - keep], False


@dataclass(eq=False)
class Job:
    """One generation request inside the scheduler."""
    prompt: list[int]
    max_tokens: int
    stops: list[str]
    sampling: Sampling
    emit: Emit
    cancel: threading.Event
    seq: int = field(default_factory=itertools.count().__next__)
    t_submit: float = field(default_factory=time.perf_counter)
    n_cached: int = 0
    n_fed: int = 0                 # prompt tokens evaluated (or taken from the cache)
    n_generated: int = 0
    next_token: int | None = None  # sampled, not yet fed back
    chain: Any = None
    text: TextStream | None = None
    t_first: float | None = None
    t_start: float | None = None   # when it got its slot
    grammar: Any = None            # a grammar sampler (llama_sampler_init_grammar), or None
    n_logprobs: int | None = None  # report logprobs with this many alternatives
    pending_lp: list[Any] = field(default_factory=list)   # TokenLogprob not yet sent
    tool_mode: bool = False        # output is tool-call blocks: held, parsed at the end
    held: list[str] = field(default_factory=list)
    watch: Any = None              # tool_choice "auto": a tools.Watch over the text
    tools: tuple[Any, ...] = ()    # the declared functions (for tools.recover)
    children: list["Job"] = field(default_factory=list)   # choices 1..n-1 (n > 1)
    background: bool = False       # a batch line: after interactive jobs, never the last slot
    max_wait: float | None = None  # s it may wait queued (Generate.max_wait)
    interval: float = 0.0          # s between two Deltas sent (design note "Pacing"); 0: each
    paced: Delta | None = None     # text held until the interval is up
    t_sent: float | None = None    # when its last Delta went out

    @property
    def argmax(self) -> bool:
        """Plain greedy with no grammar: numpy's argmax instead of the sampler chain."""
        return self.sampling.greedy and not self.constrained

    @property
    def constrained(self) -> bool:
        return self.grammar is not None

    @property
    def prefilling(self) -> bool:
        return self.next_token is None


@dataclass(eq=False)
class Slot:
    id: int                        # = the llama seq_id
    cache: list[int] = field(default_factory=list)   # tokens whose KV the sequence holds
    job: Job | None = None
    last_used: int = 0
    last_interactive: int = 0      # when an interactive job last took it (0: never)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    step = 64
    i = 0
    while i + step <= n and a[i:i + step] == b[i:i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


class BatchScheduler:
    """Runs generation for up to `n_slots` requests at once on one llama context.

    `submit` may be called from any thread; everything else that touches the context
    happens on the scheduler's own thread."""

    def __init__(self, model: llama_cpp.llama_model_p, vocab: llama_cpp.llama_vocab_p, *,
                 n_slots: int, n_ctx_slot: int, threads: int, flash_attn: bool = True,
                 n_batch: int = 512, kv_unified: bool = False) -> None:
        self.model, self.vocab = model, vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.n_batch = max(n_batch, n_slots)
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = n_ctx_slot * n_slots
        p.n_batch = p.n_ubatch = self.n_batch
        p.n_seq_max = n_slots
        p.kv_unified = kv_unified
        p.n_threads = p.n_threads_batch = threads
        p.no_perf = True
        p.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                             else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self.ctx = llama_cpp.llama_init_from_model(model, p)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create the context "
                               f"({n_slots} slots x {n_ctx_slot} tokens)")
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.n_ctx_slot = int(llama_cpp.llama_n_ctx_seq(self.ctx))
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.slots = [Slot(i) for i in range(n_slots)]
        self._use = itertools.count(1)
        self._pieces: dict[int, bytes] = {}
        # candidate buffers of constrained rows (_candidates, _sample_constrained)
        self._cand = np.zeros(self.n_vocab, dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
        self._cand["id"] = np.arange(self.n_vocab, dtype=np.int32)
        self._one = (llama_cpp.llama_token_data * 1)()
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._tps: collections.deque[tuple[float, float, int]] = collections.deque()
        self.tokens_per_s = 0.0
        self._hold: float | None = None     # s a request holds its slot (moving average)
        # Preemption (design note "A step", 4): llama.cpp asks the abort callback between
        # graph nodes; the callback is libc's strlen over a 2-byte flag buffer (true once
        # byte 0 is set), C calling C: no Python, no GIL, per node of the forward pass.
        self._abort = ctypes.create_string_buffer(2)
        self._abort_cb = llama_cpp.ggml_abort_callback(
            ctypes.cast(_LIBC.strlen, ctypes.c_void_p).value)
        llama_cpp.llama_set_abort_callback(self.ctx, self._abort_cb,
                                           ctypes.cast(self._abort, ctypes.c_void_p))
        self._background_step = False       # the decode running holds background rows only
        self.preempted = 0                  # steps aborted for an interactive request
        self._thread = threading.Thread(target=self._serve, name="llama-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ public
    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            self._queue.append(job)
            if not job.background and self._background_step:
                self._abort[0] = 1          # abort the batch lines' step: this one first
            self._cv.notify()

    @property
    def busy(self) -> int:
        return sum(1 for s in self.slots if s.job is not None)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def wait_s(self) -> float:
        """Expected seconds a request arriving now waits for a slot: 0 with a slot free and
        nobody queued; else its place in the queue (queued + 1) times the mean time a
        request holds a slot, over the slots (they free up in parallel). The hold time is
        a moving average over ended requests, at least the mean age of the running ones
        (so a node whose first requests are still running does not claim no wait)."""
        slots, busy = self.slots, self.busy
        if busy < len(slots) and not self._queue:
            return 0.0
        now = time.perf_counter()
        jobs = [s.job for s in slots]       # read once: the scheduler thread changes them
        ages = [now - j.t_start for j in jobs if j is not None and j.t_start is not None]
        hold = max(self._hold or 0.0, sum(ages) / len(ages) if ages else 0.0)
        return (len(self._queue) + 1) * hold / max(len(slots), 1)

    def stats(self) -> dict[str, Any]:
        return {"busy": self.busy, "queued": self.queued, "slots": len(self.slots),
                "tokens_per_s": round(self.tokens_per_s, 2), "wait_s": round(self.wait_s(), 2),
                "kv_used": sum(len(s.cache) for s in self.slots),     # cells holding KV
                "kv_size": self.n_ctx_slot * len(self.slots)}

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)

    # ------------------------------------------------------------ the loop
    def _serve(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._queue and self.busy == 0:
                    self._cv.wait()
                if self._closed:
                    return
            try:
                self._step()
            except Exception:  # a bug here must not silently stall every request
                log.exception("scheduler step failed")
                for s in self.slots:
                    if s.job is not None:
                        self._fail(s, "internal error in the batch scheduler")

    def _step(self) -> None:
        self._reap()
        self._admit()
        rows = self._fill()
        if not rows and self.batch.n_tokens == 0:
            return
        pure_decode = all(len(toks) == 1 and not slot.job.prefilling
                          for slot, toks in self._fed)
        self._flush_paced(not pure_decode)
        with self._cv:
            self._abort[0] = 0
            self._background_step = (all(s.job.background for s, _ in self._fed)
                                     and not any(not j.background for j in self._queue))
        t0 = time.perf_counter()
        rc = llama_cpp.llama_decode(self.ctx, self.batch)
        dt = time.perf_counter() - t0
        with self._cv:
            self._background_step = False
        if rc == 2 and self._abort[0]:
            self._undo_step()
            return
        if rc != 0:
            self._decode_failed(rc)
            return
        self._advance()
        for slot, row in rows:
            job = slot.job
            if job.children and job.prefilling:
                self._branch(slot, row)
            self._sample(slot, row)
        if pure_decode:
            self._account(dt, len(rows))

    def _sample(self, slot: Slot, row: int) -> None:
        job = slot.job
        if job.argmax:   # llama.cpp's greedy sampler: first max logit
            logits = llama_cpp.llama_get_logits_ith(self.ctx, row)
            tok = int(np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())
        else:
            tok = (self._sample_constrained(job, row) if job.constrained else
                   llama_cpp.llama_sampler_sample(job.chain, self.ctx, row))
        if job.n_logprobs is not None and not llama_cpp.llama_vocab_is_eog(self.vocab, tok):
            job.pending_lp.append(self._logprob(row, tok, job.n_logprobs))
        self._on_token(slot, tok)

    def _branch(self, parent: Slot, row: int) -> None:
        """n > 1: the parent's prompt is in; each choice's sequence gets a copy of its KV
        (`llama_memory_seq_cp`, applied before the next decode) and samples its first
        token from the parent's logits row with its own chain."""
        job = parent.job
        children, job.children = job.children, []
        for child in children:
            slot = next((s for s in self.slots if s.job is child), None)
            if slot is None:           # cancelled meanwhile
                continue
            llama_cpp.llama_memory_seq_rm(self.mem, slot.id, -1, -1)
            llama_cpp.llama_memory_seq_cp(self.mem, parent.id, slot.id, -1, -1)
            slot.cache = list(parent.cache)
            child.n_cached = job.n_cached
            self._sample(slot, row)

    # ---------------------------------------------------- step, in parts
    def _reap(self) -> None:
        for s in self.slots:
            if s.job is not None and s.job.cancel.is_set():
                self._finish(s, "cancelled")
        now = time.perf_counter()
        with self._cv:
            gone = [j for j in self._queue if j.cancel.is_set()]
            late = [j for j in self._queue if not j.cancel.is_set()
                    and j.max_wait is not None and now - j.t_submit > j.max_wait]
            for j in gone + late:
                self._queue.remove(j)
        for j in late:
            self._free_grammars(j)
            self._send(j, Failed(error="Unavailable", code="queue_timeout", message=(
                f"no slot of this model was free within {j.max_wait:g} s "
                f"({len(self._queue)} more queued); try again later")))
        for j in (j for g in gone for j in (g, *g.children)):
            if j.grammar is not None:          # never made it into a chain
                llama_cpp.llama_sampler_free(j.grammar)
                j.grammar = None
            self._send(j, Done(finish_reason="cancelled", usage=_usage(len(j.prompt), 0, 0)))

    def _free_grammars(self, job: Job) -> None:
        for j in (job, *job.children):
            if j.grammar is not None:          # never made it into a chain
                llama_cpp.llama_sampler_free(j.grammar)
                j.grammar = None

    def _admit(self) -> None:
        while True:
            free = [s for s in self.slots if s.job is None]
            with self._cv:
                job = self._next(len(free))
                if job is None:
                    return
                self._queue.remove(job)
            if job.background:
                free = self._spare(free)
            active = {s.id for s in self.slots if s.job is not None}
            best = min(free, key=lambda s: (-common_prefix(s.cache, job.prompt),
                                            _runs(active | {s.id}), s.last_used))
            n_common = common_prefix(best.cache, job.prompt)
            self._start(best, job, n_common)
            for child in job.children:
                active = {s.id for s in self.slots if s.job is not None}
                rest = [s for s in self.slots if s.job is None]
                slot = min(self._spare(rest) if job.background else rest,
                           key=lambda s: (_runs(active | {s.id}), s.last_used))
                self._start(slot, child, 0)
                child.n_fed = len(child.prompt)   # nothing to feed: it gets the parent's KV

    def _spare(self, free: list[Slot]) -> list[Slot]:
        """The free slots a background job may take: all but the one an interactive job
        used last, while another is free (module note: Prompt cache), so the slot a batch
        leaves free holds the latest conversation's prompt."""
        kept = max(free, key=lambda s: s.last_interactive)
        if len(free) < 2 or kept.last_interactive == 0:
            return free
        return [s for s in free if s is not kept]

    def _next(self, n_free: int) -> Job | None:
        """The queued job to admit now, if any: interactive ones first come first served
        (a request with n choices waits for n free slots); background ones after them,
        and only while a slot would stay free for the next interactive request (unless
        the model has a single slot)."""
        interactive = next((j for j in self._queue if not j.background), None)
        if interactive is not None:
            return interactive if n_free >= 1 + len(interactive.children) else None
        if not self._queue:
            return None
        job = self._queue[0]
        keep = 1 if len(self.slots) > 1 else 0
        return job if n_free >= 1 + len(job.children) + keep else None

    def _start(self, slot: Slot, job: Job, n_common: int) -> None:
        n_keep = min(n_common, len(job.prompt) - 1)
        if not llama_cpp.llama_memory_seq_rm(self.mem, slot.id, n_keep, -1):
            llama_cpp.llama_memory_seq_rm(self.mem, slot.id, -1, -1)
            n_keep = 0
        del slot.cache[n_keep:]
        job.t_start = time.perf_counter()
        slot.job, slot.last_used = job, next(self._use)
        if not job.background:
            slot.last_interactive = slot.last_used
        job.n_cached = job.n_fed = n_keep
        job.text = TextStream(job.stops)
        job.chain = None if job.argmax else job.sampling.chain(self.n_vocab)
        if job.sampling.penalised:
            for t in job.prompt[-PENALTY_LAST_N:]:
                llama_cpp.llama_sampler_accept(job.chain, t)

    def _fill(self) -> list[tuple[Slot, int]]:
        """Put this step's tokens into self.batch; return the rows to sample from.

        Rows go in seq_id order: with a split cache llama.cpp puts only runs of
        consecutive seq_ids into one ubatch (llama_batch_allocr::split_equal), so any
        other order costs extra forward passes."""
        busy = [s for s in self.slots if s.job is not None]
        if any(not s.job.background and s.job.n_fed < len(s.job.prompt) for s in busy):
            # an interactive prompt is being read: background rows sit this step out, so
            # its first token costs what it would on an idle node (plus one step at most)
            busy = [s for s in busy if not s.job.background]
        n_gen = sum(1 for s in busy if not s.job.prefilling)
        budget = self.n_batch - n_gen
        if n_gen:
            budget = min(budget, PREFILL_CHUNK)
        plan: dict[int, list[int]] = {}
        for s in sorted((s for s in busy if s.job.prefilling), key=lambda s: s.job.seq):
            if budget <= 0:
                break
            job = s.job
            take = job.prompt[job.n_fed:job.n_fed + budget]
            job.n_fed += len(take)
            budget -= len(take)
            plan[s.id] = take
        b = self.batch
        n = 0
        rows: list[tuple[Slot, int]] = []
        self._fed: list[tuple[Slot, list[int]]] = []
        for s in busy:
            job = s.job
            if job.prefilling:
                toks = plan.get(s.id)
                if not toks:
                    continue
                want = job.n_fed == len(job.prompt)
            else:
                toks, want = [job.next_token], True
            pos0 = len(s.cache)
            for k, t in enumerate(toks):
                b.token[n] = t
                b.pos[n] = pos0 + k
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = s.id
                b.logits[n] = 0
                n += 1
            if want:
                b.logits[n - 1] = 1
                rows.append((s, n - 1))
            self._fed.append((s, toks))
        b.n_tokens = n
        return rows

    def _advance(self) -> None:
        for slot, toks in self._fed:
            slot.cache.extend(toks)

    def _on_token(self, slot: Slot, tok: int) -> None:
        job = slot.job
        job.n_generated += 1
        if job.t_first is None:
            job.t_first = time.perf_counter()
        if llama_cpp.llama_vocab_is_eog(self.vocab, tok):
            self._finish(slot, "stop")
            return
        job.next_token = tok
        text, stopped = job.text.push(self._piece(tok))
        if text and job.tool_mode:
            job.held.append(text)
            text = ""
        elif text and job.watch is not None:
            text, call = job.watch.push(text)
            if call is not None:       # "auto": the model opened a tool call
                job.tool_mode = True
                job.held.append(call)
        if text and not self._send(job, self._delta(job, text)):
            self._finish(slot, "cancelled", quiet=True)
            return
        if stopped:
            self._finish(slot, "stop", flush=False)
        elif job.n_generated >= job.max_tokens:
            self._finish(slot, "length")

    def _finish(self, slot: Slot, reason: str, *, flush: bool = True,
                quiet: bool = False) -> None:
        job = slot.job
        slot.job = None
        slot.last_used = next(self._use)
        if job.t_start is not None:          # how long a request holds a slot (wait_s)
            held = time.perf_counter() - job.t_start
            self._hold = held if self._hold is None else (1 - HOLD_EWMA) * self._hold + HOLD_EWMA * held
        if job.chain is not None:
            llama_cpp.llama_sampler_free(job.chain)
            job.chain = None
        if job.grammar is not None:
            llama_cpp.llama_sampler_free(job.grammar)
            job.grammar = None
        if job.t_first is not None:
            log.debug("request done (%s): %d prompt (%d cached), %d generated, ttft %.3f s, "
                      "%.3f s", reason, len(job.prompt), job.n_cached, job.n_generated,
                      job.t_first - job.t_submit, time.perf_counter() - job.t_submit)
        if quiet:
            return
        if job.tool_mode and reason != "cancelled":
            text, _ = job.text.push(b"", final=True) if flush else ("", False)
            raw = "".join(job.held) + text
            calls = tools.parse(raw) if reason == "stop" else []
            if calls:
                self._send(job, Delta(text="", tool_calls=tuple(calls),
                                      logprobs=tuple(job.pending_lp)))
                reason = "tool_calls"
            elif raw or job.pending_lp:
                self._send(job, self._delta(job, raw))
        elif job.watch is not None and reason != "cancelled":
            text, _ = job.text.push(b"", final=True) if flush else ("", False)
            shown, call = job.watch.push(text) if text else ("", None)
            rest = (call or "") + job.watch.rest()
            calls = (tools.parse(rest) if call is not None else
                     tools.recover(rest, job.tools)) if reason == "stop" else []
            if calls:
                if shown:
                    self._send(job, self._delta(job, shown))
                self._send(job, Delta(text="", tool_calls=tuple(calls),
                                      logprobs=tuple(job.pending_lp)))
                reason = "tool_calls"
            elif shown + rest or job.pending_lp:
                self._send(job, self._delta(job, shown + rest))
        elif flush and reason != "cancelled":
            text, _ = job.text.push(b"", final=True)
            if text or job.pending_lp:
                self._send(job, self._delta(job, text))
        self._send(job, Done(finish_reason=reason,
                             stop_sequence=job.text.matched if job.text else None,
                             usage=_usage(len(job.prompt), job.n_generated, job.n_cached)))

    def _fail(self, slot: Slot, message: str) -> None:
        job = slot.job
        slot.job = None
        if job.chain is not None:
            llama_cpp.llama_sampler_free(job.chain)
            job.chain = None
        if job.grammar is not None:
            llama_cpp.llama_sampler_free(job.grammar)
            job.grammar = None
        llama_cpp.llama_memory_seq_rm(self.mem, slot.id, -1, -1)
        slot.cache.clear()
        self._send(job, Failed(error="BackendError", message=message, code="backend_error"))
        for child in job.children:     # choices still waiting for this prompt
            waiting = next((s for s in self.slots if s.job is child), None)
            if waiting is not None:
                self._fail(waiting, message)

    def _undo_step(self) -> None:
        """An aborted decode (an interactive request arrived during a step of batch
        lines): whatever llama.cpp kept of it is removed (every fed sequence goes back to
        the cells its slot's cache names), prompt tokens count as not fed, and the next
        step starts with the interactive request's prompt."""
        self.preempted += 1
        log.debug("a step of batch lines was aborted for an interactive request (%d so far)",
                  self.preempted)
        for slot, toks in self._fed:
            llama_cpp.llama_memory_seq_rm(self.mem, slot.id, len(slot.cache), -1)
            if slot.job is not None and slot.job.prefilling:
                slot.job.n_fed -= len(toks)

    def _decode_failed(self, rc: int) -> None:
        log.error("llama_decode returned %d for a batch of %d tokens", rc, self.batch.n_tokens)
        for slot, _ in self._fed:
            if slot.job is not None:
                self._fail(slot, f"llama_decode failed ({rc})")

    def _send(self, job: Job, event: Delta | Done | Failed) -> bool:
        """Emit an event (paced: a Delta may be held, design note "Pacing"); False when the
        other side is gone (the request is dropped)."""
        try:
            if job.interval:
                event = self._pace(job, event)
                if event is None:
                    return True
            job.emit(event)
            return True
        except Exception as exc:  # OSError when the parent went away, or a frame error
            log.warning("dropping a request: cannot send its frame (%s)", exc)
            job.cancel.set()
            return False

    def _pace(self, job: Job, ev: Delta | Done | Failed) -> Delta | Done | Failed | None:
        """The event to send now, None when it is held: a Delta within `interval` of the
        last one sent joins the held text; anything else first sends what is held."""
        held, job.paced = job.paced, None
        if held is not None:
            both = merged(held, ev)
            if both is None:
                job.emit(held)
                job.t_sent = time.perf_counter()
            else:
                ev = both
        if type(ev) is not Delta:
            return ev
        now = time.perf_counter()
        if job.t_sent is None or now - job.t_sent >= job.interval:
            job.t_sent = now
            return ev
        job.paced = ev
        return None

    def _flush_paced(self, everything: bool) -> None:
        """Before a step: send the text held for every job whose interval is over (a job
        that sat out the last step), or for all (`everything`: the step reads a prompt,
        which may take far longer than a token's step)."""
        now = time.perf_counter()
        for s in self.slots:
            job = s.job
            if job is None or job.paced is None:
                continue
            if everything or now >= job.t_sent + job.interval:
                ev, job.paced, job.t_sent = job.paced, None, None    # None: sent at once
                if not self._send(job, ev):
                    self._finish(s, "cancelled", quiet=True)

    def _candidates(self, row: int) -> Any:
        """The row's logits as a llama_token_data_array (reused buffer, no sort)."""
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, row),
                                       shape=(self.n_vocab,))
        self._cand["logit"] = logits
        self._cand["p"] = 0.0
        return llama_cpp.llama_token_data_array(
            data=self._cand.ctypes.data_as(llama_cpp.llama_token_data_p), size=self.n_vocab,
            selected=-1, sorted=False)

    def _sample_constrained(self, job: Job, row: int) -> int:
        """Sample as llama.cpp's common sampler does: the free chain first; the grammar
        checks that one token; only when it refuses is the grammar applied to the whole
        vocabulary (slow: it walks every token's text) before the chain samples again.
        Then the grammar and the chain both accept the token."""
        cur = self._candidates(row)
        llama_cpp.llama_sampler_apply(job.chain, ctypes.byref(cur))
        tok = int(cur.data[cur.selected].id)
        one = self._one
        one[0].id, one[0].logit, one[0].p = tok, 1.0, 0.0
        single = llama_cpp.llama_token_data_array(data=one, size=1, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(job.grammar, ctypes.byref(single))
        if not np.isfinite(one[0].logit):
            cur = self._candidates(row)
            llama_cpp.llama_sampler_apply(job.grammar, ctypes.byref(cur))
            llama_cpp.llama_sampler_apply(job.chain, ctypes.byref(cur))
            tok = int(cur.data[cur.selected].id)
        llama_cpp.llama_sampler_accept(job.grammar, tok)
        llama_cpp.llama_sampler_accept(job.chain, tok)
        return tok

    def _delta(self, job: Job, text: str) -> Delta:
        lps, job.pending_lp = tuple(job.pending_lp), []
        return Delta(text=text, logprobs=lps)

    def _logprob(self, row: int, tok: int, n_top: int) -> TokenLogprob:
        """The model's log-probability of `tok` at `row` (log-softmax of the raw logits)
        and its `n_top` most likely alternatives."""
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, row),
                                       shape=(self.n_vocab,)).astype(np.float64)
        m = logits.max()
        lse = m + np.log(np.exp(logits - m).sum())
        top: tuple[TopLogprob, ...] = ()
        if n_top:
            idx = np.argpartition(-logits, n_top - 1)[:n_top]
            idx = idx[np.argsort(-logits[idx], kind="stable")]
            top = tuple(self._top(int(i), float(logits[i] - lse)) for i in idx)
        piece = self._piece(tok)
        return TokenLogprob(token=piece.decode("utf-8", errors="replace"),
                            logprob=float(logits[tok] - lse), bytes=tuple(piece), top=top)

    def _top(self, tok: int, lp: float) -> TopLogprob:
        piece = self._piece(tok)
        return TopLogprob(token=piece.decode("utf-8", errors="replace"), logprob=lp,
                          bytes=tuple(piece))

    def _piece(self, tok: int) -> bytes:
        piece = self._pieces.get(tok)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self.vocab, tok, buf, 64, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.vocab, tok, buf, -n, 0, False)
            piece = self._pieces[tok] = buf.raw[:max(n, 0)]
        return piece

    def _account(self, dt: float, n_out: int) -> None:
        now = time.monotonic()
        self._tps.append((now, dt, n_out))
        while self._tps and now - self._tps[0][0] > TPS_WINDOW_S:
            self._tps.popleft()
        busy = sum(d for _, d, _ in self._tps)
        if busy > 0:
            self.tokens_per_s = sum(k for _, _, k in self._tps) / busy


class Choices:
    """The events of n > 1 choices of one request, as one stream (mesh/wire/inference.py):
    each choice's Deltas get its index, its Done becomes a Delta holding its
    finish_reason, and one Done (prompt counted once, completions summed) ends the
    stream after the last choice; the first Failed ends it for all."""

    def __init__(self, n: int, emit: Emit) -> None:
        self.left, self.emit = n, emit
        self.completion = 0
        self.over = False

    def emitter(self, index: int) -> Emit:
        def emit(ev: Any) -> None:
            if self.over:
                return
            if isinstance(ev, Delta):
                self.emit(ev.model_copy(update={"index": index}))
            elif isinstance(ev, Failed):
                self.over = True
                self.emit(ev)
            elif isinstance(ev, Done):
                self.emit(Delta(text="", index=index, finish_reason=ev.finish_reason))
                self.completion += ev.usage.completion_tokens
                self.left -= 1
                if index == 0:
                    self.prompt, self.cached = ev.usage.prompt_tokens, ev.usage.cached_tokens
                if self.left == 0:
                    self.over = True
                    self.emit(Done(finish_reason=ev.finish_reason, usage=_usage(
                        self.prompt, self.completion, self.cached)))
        return emit


def _runs(ids: set[int]) -> int:
    """Runs of consecutive ids: the ubatches one decode of these sequences costs."""
    return sum(1 for i in ids if i - 1 not in ids)


def _usage(prompt: int, completion: int, cached: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion, cached_tokens=cached)
