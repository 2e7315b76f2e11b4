"""llama.cpp backend (runs inside a worker process).

Chat prompts are rendered with the model's own chat template (GGUF metadata, or the
per-model `chat_template` override) and tokenized here, so the worker knows exact
prompt/completion token counts. Generation streams one `delta` frame per decoded piece
and checks the request's cancel flag between tokens, so a client disconnect stops the
model within one token.

Embeddings use a second llama context on the same file with mean pooling (a causal chat
model has no pooling of its own); it is created on the first embedding request.

`Llama` has no lock and aborts the process when two threads use it at once (design.md):
each Llama object here is used by one thread at a time, guarded by its own lock.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from node.backends import RequestError

log = logging.getLogger("node.backends.llama")

Emit = Callable[[dict[str, Any]], None]


class LlamaBackend:
    name = "llama"

    def __init__(self, model_path: str, config: dict[str, Any]) -> None:
        self.model_path = model_path
        self.config = config
        self.n_ctx = int(config.get("context_size") or 2048)
        self.threads = int(config.get("threads") or os.cpu_count() or 1)
        self.defaults: dict[str, Any] = dict(config.get("sampling") or {})
        self.llm = llama_cpp.Llama(
            model_path=model_path, n_ctx=self.n_ctx, n_threads=self.threads,
            n_threads_batch=self.threads, n_gpu_layers=int(config.get("gpu_layers", -1)),
            flash_attn=True, verbose=False,
        )
        self._lock = threading.Lock()
        self._emb: llama_cpp.Llama | None = None
        self._emb_lock = threading.Lock()
        eos_id, bos_id = self.llm.token_eos(), self.llm.token_bos()
        eos = self.llm._model.token_get_text(eos_id) if eos_id != -1 else ""
        bos = self.llm._model.token_get_text(bos_id) if bos_id != -1 else ""
        template = config.get("chat_template") or self.llm.metadata.get("tokenizer.chat_template")
        self.formatter = (Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos,
                                              stop_token_ids=[eos_id]) if template else None)
        self.eos_text = eos
        self.busy = 0
        self.tokens_per_s = 0.0

    # ------------------------------------------------------------------ info
    def info(self) -> dict[str, Any]:
        return {"backend": self.name, "ctx": self.n_ctx, "n_embd": self.llm.n_embd(),
                "slots": 1, "embeddings": bool(self.config.get("embeddings", True)),
                "chat_template": self.formatter is not None}

    def stats(self) -> dict[str, Any]:
        return {"busy": self.busy, "tokens_per_s": round(self.tokens_per_s, 2)}

    # ------------------------------------------------------------ generation
    def _prompt_tokens(self, req: dict[str, Any]) -> tuple[list[int], list[str]]:
        if req["kind"] == "chat":
            if self.formatter is None:
                raise RequestError("this model has no chat template; use /v1/completions")
            try:
                result = self.formatter(messages=req["messages"])
            except Exception as exc:  # jinja raise_exception() from the template
                raise RequestError(f"chat template rejected the messages: {exc}",
                                   param="messages") from exc
            toks = self.llm.tokenize(result.prompt.encode("utf-8"),
                                     add_bos=not result.added_special, special=True)
            return toks, [self.eos_text] if self.eos_text else []
        prompt = req["prompt"]
        return self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True), []

    def generate(self, req: dict[str, Any], emit: Emit, cancel: threading.Event) -> None:
        prompt, extra_stop = self._prompt_tokens(req)
        n_prompt = len(prompt)
        if n_prompt >= self.n_ctx:
            raise RequestError(
                f"This model's maximum context length is {self.n_ctx} tokens. However, your "
                f"messages resulted in {n_prompt} tokens.", code="context_length_exceeded",
                param="messages" if req["kind"] == "chat" else "prompt")
        room = self.n_ctx - n_prompt
        max_tokens = req.get("max_tokens")
        max_tokens = room if max_tokens is None else min(int(max_tokens), room)
        stop = list(req.get("stop") or []) + extra_stop
        p = {**self.defaults, **{k: v for k, v in req.items() if v is not None}}
        counted = [0]

        def count(_ids, logits):  # called once per sampled token
            counted[0] += 1
            return logits

        with self._lock:
            self.busy += 1
            t0 = time.perf_counter()
            t_first = None
            finish = "stop"
            try:
                it = self.llm.create_completion(
                    prompt, max_tokens=max_tokens, stream=True, stop=stop,
                    temperature=float(p.get("temperature", 0.8)),
                    top_p=float(p.get("top_p", 0.95)), top_k=int(p.get("top_k", 40)),
                    min_p=float(p.get("min_p", 0.05)),
                    presence_penalty=float(p.get("presence_penalty", 0.0)),
                    frequency_penalty=float(p.get("frequency_penalty", 0.0)),
                    repeat_penalty=float(p.get("repeat_penalty", 1.0)),
                    seed=p.get("seed"),
                    logits_processor=llama_cpp.LogitsProcessorList([count]),
                )
                try:
                    for chunk in it:
                        if cancel.is_set():
                            finish = "cancelled"
                            break
                        choice = chunk["choices"][0]
                        text = choice.get("text") or ""
                        if text:
                            if t_first is None:
                                t_first = time.perf_counter()
                            emit({"type": "delta", "text": text})
                        if choice.get("finish_reason"):
                            finish = choice["finish_reason"]
                finally:
                    it.close()
            finally:
                self.busy -= 1
            dt = time.perf_counter() - (t_first or t0)
            n = counted[0]
            if n > 1 and dt > 0:
                self.tokens_per_s = (n - 1) / dt
        emit({"type": "done", "finish_reason": finish,
              "usage": {"prompt_tokens": n_prompt, "completion_tokens": n,
                        "total_tokens": n_prompt + n,
                        "prompt_tokens_details": {"cached_tokens": 0}}})

    # ------------------------------------------------------------ embeddings
    def embed(self, inputs: list[str]) -> dict[str, Any]:
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
                n = len(self._emb.tokenize(text.encode("utf-8"), add_bos=True, special=True))
                if n > self.n_ctx:
                    raise RequestError(
                        f"input[{i}] has {n} tokens, over this model's {self.n_ctx}",
                        code="context_length_exceeded", param="input")
            vectors, count = self._emb.embed(inputs, normalize=True, truncate=False,
                                             return_count=True)
        return {"data": vectors, "prompt_tokens": count}
