"""llama.cpp backend (runs inside a worker process).

Chat prompts are rendered with the model's own chat template (GGUF metadata, or the
per-model `chat_template` override) and tokenized here, so the worker knows exact
prompt/completion token counts.

Generation runs on node/backends/batching.py: `parallel` slots (per-model config; "auto",
the default, is node/placement.py's rule: up to 8 as the free RAM allows) share one llama context in a split KV cache (n_ctx = context_size * parallel, one
seq_id per slot, each slot limited to context_size tokens, as llama-server does), one
scheduler thread batches every running request's next token with chunks of new prompts,
and a slot's previous conversation is reused as a prompt cache. `submit` validates a
request (errors raise RequestError before any event is sent) and hands it over without
blocking; the request then streams `Delta` events and ends with one `Done`, or a
`Failed` if llama.cpp fails (mesh/wire/inference.py). Setting the request's cancel event ends it with
finish_reason "cancelled" at the next step.

Embeddings use a second llama context on the same file with mean pooling (a causal chat
model has no pooling of its own); it is created on the first embedding request.
`Llama` has no lock and aborts the process when two threads use it at once (design.md):
the embedding Llama is guarded by its own lock; the generation context is only ever
touched by the scheduler thread.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import threading
from typing import Any, Callable

import llama_cpp
from llama_cpp._internals import LlamaModel
from llama_cpp._logger import set_verbose
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from mesh.errors import BadRequest
from mesh.wire.inference import Detokenize, Embed, Generate, Tokenize
from mesh.wire.schema import check_schema
from node.backends import RequestError, tools
from node.backends.gbnf import JSON_GBNF, from_schema
from node.backends.batching import BatchScheduler, Choices, Job, Sampling
from node import resources
from node.placement import kv_shape, slots
from node.rpc import split_params

log = logging.getLogger("node.backends.llama")

Emit = Callable[[Any], None]

DEFAULT_CONTEXT = 2048     # per slot (node/placement.py DEFAULT_CONTEXT)
GRAMMAR_CACHE = 64         # parsed grammars kept (one per distinct schema)
STREAM_INTERVAL_MS = 20    # default stream_interval_ms (batching.py design note "Pacing")


class LlamaBackend:
    name = "llama"

    def __init__(self, model_path: str, config: dict[str, Any]) -> None:
        self.model_path = model_path
        self.config = config
        self.n_ctx = int(config.get("context_size") or DEFAULT_CONTEXT)
        # default: the CPUs this process may run on (taskset, cgroup cpusets), not all
        self.threads = int(config.get("threads") or len(os.sched_getaffinity(0)))
        self.defaults: dict[str, Any] = dict(config.get("sampling") or {})
        # s between two text events of a stream (batching.py design note "Pacing")
        interval = config.get("stream_interval_ms")
        self.stream_interval = (STREAM_INTERVAL_MS if interval is None else float(interval)) / 1000
        set_verbose(False)            # llama.cpp's log callback: errors only
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        gpu_layers = config.get("gpu_layers")
        mparams.n_gpu_layers = -1 if gpu_layers is None else int(gpu_layers)
        self._split = split_params(mparams, config)   # over RPC peers (node/rpc.py), or None
        self.model = LlamaModel(path_model=model_path, params=mparams, verbose=False)
        meta = self.model.metadata()          # the loaded model's: no second read of the file
        self.parallel = slots(config, kv_shape(meta), resources.read().ram_free)
        self.scheduler = BatchScheduler(self.model.model, self.model.vocab,
                                        n_slots=self.parallel, n_ctx_slot=self.n_ctx,
                                        threads=self.threads, flash_attn=True)
        self.n_ctx = self.scheduler.n_ctx_slot
        self._emb: llama_cpp.Llama | None = None
        self._emb_lock = threading.Lock()
        self._grammars: dict[str, Any] = {}          # schema hash -> parsed grammar sampler
        self._grammar_lock = threading.Lock()
        eos_id, bos_id = self.model.token_eos(), self.model.token_bos()
        eos = self.model.token_get_text(eos_id) if eos_id != -1 else ""
        bos = self.model.token_get_text(bos_id) if bos_id != -1 else ""
        template = config.get("chat_template") or meta.get("tokenizer.chat_template")
        self.formatter = (Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos,
                                              stop_token_ids=[eos_id]) if template else None)
        self.template_has_tools = bool(template and "tools" in template)
        self.eos_text = eos

    # ------------------------------------------------------------------ info
    def info(self) -> dict[str, Any]:
        return {"backend": self.name, "ctx": self.n_ctx, "n_embd": self.model.n_embd(),
                "slots": self.parallel, "parallel": self.config.get("parallel", "auto"), "kv": "split",
                "embeddings": bool(self.config.get("embeddings", True)),
                "chat_template": self.formatter is not None,
                "tools": self.template_has_tools}

    def stats(self) -> dict[str, Any]:
        return self.scheduler.stats()

    # ------------------------------------------------------------ generation
    def _prompt_tokens(self, req: Generate) -> tuple[list[int], list[str]]:
        if req.messages is not None:
            if self.formatter is None:
                raise RequestError("this model has no chat template; use /v1/completions")
            messages = tools.template_messages(req, self.template_has_tools)
            offered = (tools.template_tools(req.tools)
                       if req.tools and self.template_has_tools
                       else None)
            try:
                result = self.formatter(messages=messages, tools=offered)
            except Exception as exc:  # jinja raise_exception() from the template
                raise RequestError(f"chat template rejected the messages: {exc}",
                                   param="messages") from exc
            toks = self.model.tokenize(result.prompt.encode("utf-8"),
                                       add_bos=not result.added_special, special=True)
            return toks, [self.eos_text] if self.eos_text else []
        return self.model.tokenize((req.prompt or "").encode("utf-8"), add_bos=True,
                                   special=True), []

    def _job(self, req: Generate, emit: Emit, cancel: threading.Event) -> Job:
        prompt, extra_stop = self._prompt_tokens(req)
        n_prompt = len(prompt)
        param = "messages" if req.chat else "prompt"
        if n_prompt == 0:
            raise RequestError("the prompt is empty", param=param)
        if n_prompt >= self.n_ctx:
            raise RequestError(
                f"This model's maximum context length is {self.n_ctx} tokens. However, your "
                f"messages resulted in {n_prompt} tokens.", code="context_length_exceeded",
                param=param)
        room = self.n_ctx - n_prompt
        max_tokens = room if req.max_tokens is None else max(1, min(req.max_tokens, room))
        n_vocab = self.model.n_vocab()
        bad = [t for t, _ in req.logit_bias if not 0 <= t < n_vocab]
        if bad:
            raise RequestError(f"logit_bias names token {bad[0]}, outside this model's "
                               f"vocabulary of {n_vocab}", param="logit_bias")
        if req.n > self.parallel:
            raise RequestError(f"n is {req.n}, above the {self.parallel} sequences this model "
                               "runs at once", param="n")
        p = {**self.defaults, **req.sampling.given(), "logit_bias": req.logit_bias}
        choices = Choices(req.n, emit) if req.n > 1 else None

        def choice(i: int) -> Job:
            seed = p.get("seed")
            sampling = Sampling.from_params({**p, "seed": None if seed is None else seed + i})
            return Job(prompt=prompt, max_tokens=max_tokens, stops=list(req.stop) + extra_stop,
                       sampling=sampling, emit=choices.emitter(i) if choices else emit,
                       cancel=cancel, grammar=self._grammar(req), n_logprobs=req.logprobs,
                       tool_mode=tools.forced(req),
                       watch=tools.Watch() if tools.auto(req) else None, tools=req.tools,
                       background=req.background, max_wait=req.max_wait,
                       interval=self.stream_interval if req.stream else 0.0)

        job = choice(0)
        job.children = [choice(i) for i in range(1, req.n)]
        return job

    def _grammar(self, req: Generate) -> Any:
        """A fresh grammar sampler for the request's constraint (None for free text).
        Grammars are parsed once per schema (GRAMMAR_CACHE kept) and cloned per request."""
        rf = req.response_format
        lazy = tools.auto(req)
        if tools.forced(req) or lazy:
            if rf is not None:
                raise RequestError("response_format cannot be combined with tools",
                                   param="response_format")
            spec = json.dumps([[t.model_dump() for t in req.tools], req.tool_choice,
                               req.parallel_tool_calls], sort_keys=True)
            key = "tools:" + hashlib.sha256(spec.encode()).hexdigest()
            make = lambda: tools.grammar(req)  # noqa: E731
        elif rf is None:
            return None
        elif rf.type == "json_object":
            key, make = "json_object", lambda: JSON_GBNF
        else:
            schema = rf.json_schema if rf.json_schema is not None else {}
            check_schema(schema)
            text = json.dumps(schema, sort_keys=True)
            key = hashlib.sha256(text.encode()).hexdigest()
            make = lambda: from_schema(text)  # noqa: E731
        with self._grammar_lock:
            base = self._grammars.get(key)
            if base is None:
                try:
                    gbnf = make()
                except BadRequest:         # a schema outside the subset: already a 400
                    raise
                except Exception as exc:   # the converter raises ValueError, KeyError, ...
                    raise RequestError(f"could not turn the JSON schema into a grammar: {exc}",
                                       param="response_format", code="invalid_schema") from exc
                base = (self._lazy_grammar(gbnf) if lazy else llama_cpp.llama_sampler_init_grammar(
                    self.model.vocab, gbnf.encode(), b"root"))
                if not base:
                    raise RequestError("llama.cpp refused the grammar made from this schema",
                                       param="response_format", code="invalid_schema")
                if len(self._grammars) >= GRAMMAR_CACHE:
                    llama_cpp.llama_sampler_free(self._grammars.pop(next(iter(self._grammars))))
                self._grammars[key] = base
            return llama_cpp.llama_sampler_clone(base)

    def _lazy_grammar(self, gbnf: str) -> Any:
        """The tool-call grammar, dormant until the output matches tools.TRIGGER."""
        patterns = (ctypes.c_char_p * 1)(tools.TRIGGER.encode())
        return llama_cpp.llama_sampler_init_grammar_lazy_patterns(
            self.model.vocab, gbnf.encode(), b"root", patterns, 1,
            (llama_cpp.llama_token * 0)(), 0)

    def submit(self, req: Generate, emit: Emit, cancel: threading.Event) -> None:
        """Queue a generation and return at once; events go to `emit` from the scheduler
        thread. Raises RequestError (nothing emitted) for a request that cannot run."""
        self.scheduler.submit(self._job(req, emit, cancel))

    # ------------------------------------------------------------ token ids
    def tokenize(self, req: Tokenize) -> dict[str, Any]:
        if req.messages is not None:
            toks, _ = self._prompt_tokens(Generate(model=req.model, messages=req.messages,
                                                   tools=req.tools))
        else:
            toks = self.model.tokenize(req.content.encode("utf-8"), add_bos=req.add_special,
                                       special=True)
        out: dict[str, Any] = {"tokens": toks}
        if req.with_pieces:
            out["pieces"] = [self._piece_text(t) for t in toks]
        return out

    def _piece_text(self, tok: int) -> str | list[int]:
        """llama-server's piece: the text, or its bytes when not valid UTF-8 alone."""
        raw = self.model.detokenize([tok], special=True)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return list(raw)

    def detokenize(self, req: Detokenize) -> dict[str, Any]:
        n_vocab = self.model.n_vocab()
        bad = [t for t in req.tokens if not 0 <= t < n_vocab]
        if bad:
            raise RequestError(f"token {bad[0]} is outside this model's vocabulary of "
                               f"{n_vocab}", param="tokens")
        raw = self.model.detokenize(list(req.tokens), special=True)
        return {"content": raw.decode("utf-8", errors="replace")}

    # ------------------------------------------------------------ embeddings
    def embed(self, req: Embed) -> dict[str, Any]:
        inputs = list(req.inputs)
        if not self.config.get("embeddings", True):
            raise RequestError("embeddings are disabled for this model", code="unsupported")
        with self._emb_lock:
            if self._emb is None:
                self._emb = llama_cpp.Llama(
                    model_path=self.model_path, n_ctx=self.n_ctx, n_threads=self.threads,
                    n_threads_batch=self.threads, embedding=True,
                    pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, verbose=False,
                    n_gpu_layers=int(self.config.get("gpu_layers", -1)))
            for i, text in enumerate(inputs):
                if not text:         # llama.cpp fails the decode of an empty sequence
                    raise RequestError(f"input[{i}] is empty", param="input")
                n = len(self._emb.tokenize(text.encode("utf-8"), add_bos=True, special=True))
                if n > self.n_ctx:
                    raise RequestError(
                        f"input[{i}] has {n} tokens, over this model's {self.n_ctx}",
                        code="context_length_exceeded", param="input")
            vectors, count = self._emb.embed(inputs, normalize=True, truncate=False,
                                             return_count=True)
        return {"data": vectors, "prompt_tokens": count}
