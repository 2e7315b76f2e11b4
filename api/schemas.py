"""Request bodies of the OpenAI routes, validated with pydantic.

Every field of OpenAI's request schemas is declared here and classified in CHAT_FIELDS /
COMPLETION_FIELDS (docs/openai-fields.md prints the table; tests/test_openai_fields.py
walks ../shared/data/openai-openapi.json so that a field cannot slip through
unclassified):
    honoured   it does what OpenAI documents
    accepted   meaningless on a self-hosted node (user, metadata, store, ...): accepted,
               changes nothing, as documented
    refused    not supported (yet): a 400 naming it unless it holds its neutral value
A field OpenAI does not define is a 400 "unrecognized request argument" (extra="forbid"),
as OpenAI answers; top_k, min_p and repeat_penalty are llama.cpp extensions, honoured."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    refusal: str | None = None            # an earlier answer's refusal text: history only
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _no_tool_history(self):
        for name in ("function_call", "audio"):
            if getattr(self, name):
                raise ValueError(f"messages with '{name}' are not supported by this server yet")
        for call in self.tool_calls or []:
            fn = call.get("function") if isinstance(call, dict) else None
            if (call.get("type", "function") != "function" or not isinstance(fn, dict)
                    or not isinstance(fn.get("name"), str)
                    or not isinstance(fn.get("arguments", ""), str) or not call.get("id")):
                raise ValueError("each tool_calls entry needs an id and a function with a "
                                 "name and arguments (a JSON string)")
        if self.role == "function":
            raise ValueError("the 'function' role is not supported by this server yet")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            parts = []
            for p in self.content:
                if p.get("type") != "text":
                    raise ValueError(f"content part of type {p.get('type')!r} is not supported")
                parts.append(str(p.get("text", "")))
            return "".join(parts)
        return self.content or ""


class _Sampling(_Req):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repeat_penalty: float | None = Field(None, gt=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=16)      # the backend refuses more than its parallel slots
    user: str | None = None
    logit_bias: dict[str, float] | None = None       # token id (as a string) -> -100..100

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        for k, b in (v or {}).items():
            if not k.isdigit():
                raise ValueError(f"logit_bias keys are token ids, not {k!r}")
            if not -100 <= b <= 100:
                raise ValueError(f"logit_bias values are between -100 and 100, not {b}")
        return v

    def bias(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items())

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, str):
            v = [v]
        if v is not None and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def sampling(self) -> dict[str, Any]:
        keys = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                "frequency_penalty", "repeat_penalty")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


class JsonSchemaFormat(BaseModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format; a `schema` beside type json_object (the form llama-server,
    Together and instructor's JSON_SCHEMA mode send) constrains like json_schema."""
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs 'json_schema'")
        return self


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs to be true")
        return self

    # accepted, meaningless here
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    # refused unless neutral
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    moderation: Any = None
    prompt_cache_options: Any = None

    def n_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=0)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("exactly one prompt is supported per request")
            v = v[0]
        return v

    def limit(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else 16  # OpenAI's default


class EmbeddingRequest(_Req):
    model: str
    input: str | list[str] = Field(...)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _nonempty(cls, v):
        items = [v] if isinstance(v, str) else v
        if not items:
            raise ValueError("input must not be empty")
        if any(not s for s in items):
            raise ValueError("input must not contain empty strings")
        if len(items) > 2048:
            raise ValueError("at most 2048 inputs per request")
        return v


class TranscriptionForm(BaseModel):
    model: str
    language: str | None = None
    prompt: str | None = None
    response_format: Literal["json", "text", "srt", "verbose_json", "vtt"] = "json"
    temperature: float = Field(0.0, ge=0, le=1)


H, A, R = "honoured", "accepted", "refused"
CHAT_FIELDS = {
    "model": H, "messages": H, "max_tokens": H, "max_completion_tokens": H, "temperature": H,
    "top_p": H, "stop": H, "seed": H, "presence_penalty": H, "frequency_penalty": H,
    "stream": H, "stream_options": H, "n": H, "response_format": H, "logprobs": H,
    "top_logprobs": H, "logit_bias": H, "tools": H, "tool_choice": H,
    "parallel_tool_calls": H,
    "user": A, "metadata": A, "store": A, "service_tier": A, "safety_identifier": A,
    "prompt_cache_key": A, "prompt_cache_retention": A,
    "functions": R, "function_call": R,
    "audio": R, "modalities": R, "prediction": R,
    "web_search_options": R, "reasoning_effort": R, "verbosity": R, "moderation": R,
    "prompt_cache_options": R,
}
COMPLETION_FIELDS = {
    "model": H, "prompt": H, "max_tokens": H, "temperature": H, "top_p": H, "stop": H,
    "seed": H, "presence_penalty": H, "frequency_penalty": H, "stream": H,
    "stream_options": H, "n": H, "echo": H, "logprobs": H, "logit_bias": H,
    "user": A,
    "best_of": R, "suffix": R,
}
# The value a refused field may hold: it asks for nothing beyond what we do.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "functions": (None, []),
    "modalities": (None, ["text"]), "best_of": (None, 1), "suffix": (None, ""),
}
