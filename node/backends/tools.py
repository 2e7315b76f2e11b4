"""Function calling for the llama backend: the prompt, the grammar, the parse.

- Prompt: the model's own chat template renders `tools` (GGUF metadata, Jinja, as
  transformers does), and the history's assistant `tool_calls` and `tool` results. A
  template that never mentions `tools` gets FALLBACK_PROMPT as a system message instead,
  listing the functions and the `<tool_call>` format (Hermes/Qwen style).
- Grammar: `tool_choice` "required" or a function's name forces the output into
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks (one, or several
  with parallel_tool_calls), whose JSON is constrained by the function's parameters
  schema (the subset of mesh/wire/schema.py, turned into GBNF like response_format).
- "auto": the model chooses. The same grammar is *lazy* (llama.cpp's
  `llama_sampler_init_grammar_lazy_patterns`): free text until the output matches
  TRIGGER (the model opened `<tool_call>`), constrained from there, so a call the model
  starts is always well-formed. While the text streams, `Watch` holds back anything that
  could still become `<tool_call>` (as stop strings are held) and an answer that opens
  like bare or fenced JSON (```json {"name": ...}```, which small models write instead of
  the tags); at the end such an answer becomes a call when it names a declared function
  with an object of arguments (`recover`), and is released as text otherwise.
- Parse: the blocks are read back into ToolCall(id, name, arguments as JSON text).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from mesh.wire.inference import Generate, Tool, ToolCall
from mesh.wire.schema import check_schema
from node.backends.gbnf import from_schema

OPEN, CLOSE = "<tool_call>", "</tool_call>"
FALLBACK_PROMPT = (
    "You may call functions. The functions, as JSON signatures:\n{tools}\n"
    "To call one, answer with a JSON object of the function's name and arguments within "
    "<tool_call></tool_call> tags:\n<tool_call>\n{{\"name\": <function-name>, "
    "\"arguments\": <args-json-object>}}\n</tool_call>")
_BLOCK = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)
# the lazy grammar's trigger: it must match the whole output so far; the grammar is fed
# the output from the start of group 1 on
TRIGGER = r"[\s\S]*?(<tool_call>[\s\S]*)"
_JSON_OPENINGS = ("{", "```json", "```\n{")
_FENCED = re.compile(r"^\s*(?:```(?:json)?\s*)?(\{.*\})\s*(?:```)?\s*$", re.S)


def template_tools(tools: tuple[Tool, ...]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                              "parameters": t.parameters}} for t in tools]


def template_messages(req: Generate, template_has_tools: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in req.messages or ():
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.name:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.name, "arguments": _loads(c.arguments)}} for c in m.tool_calls]
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    if req.tools and not template_has_tools:
        sigs = "\n".join(json.dumps(t) for t in template_tools(req.tools))
        out.insert(0, {"role": "system", "content": FALLBACK_PROMPT.format(tools=sigs)})
    return out


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def forced(req: Generate) -> bool:
    return bool(req.tools) and req.tool_choice not in ("none", "auto")


def auto(req: Generate) -> bool:
    return bool(req.tools) and req.tool_choice == "auto"


def grammar(req: Generate) -> str:
    """GBNF of tool-call blocks for the chosen function(s) (all of them for "auto")."""
    tools = [t for t in req.tools if req.tool_choice in ("required", "auto", t.name)]
    alternatives = []
    for t in tools:
        check_schema(t.parameters, param="tools.function.parameters")
        alternatives.append({"type": "object", "properties": {
            "name": {"const": t.name}, "arguments": t.parameters or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False})
    schema = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    gbnf = from_schema(json.dumps(schema))
    gbnf = re.sub(r"^root ::=", "call ::=", gbnf, flags=re.M)
    block = r'"<tool_call>\n" call "\n</tool_call>"'
    more = rf' ("\n" {block})*' if req.parallel_tool_calls else ""
    return f"root ::= {block}{more}\n{gbnf}"


def parse(text: str) -> list[ToolCall]:
    calls = []
    for m in _BLOCK.finditer(text):
        obj = json.loads(m.group(1))
        calls.append(ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=str(obj["name"]),
                              arguments=json.dumps(obj.get("arguments", {}), ensure_ascii=False)))
    return calls


def recover(text: str, tools: tuple[Tool, ...]) -> list[ToolCall]:
    """Calls written without the tags: `{"name": ..., "arguments": {...}}`, bare or in a
    ```json fence, naming a declared function. [] when the text is not such a call."""
    m = _FENCED.match(text)
    if m is None:
        return []
    try:
        obj = json.loads(m.group(1))
    except ValueError:
        return []
    names = {t.name for t in tools}
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return []
    args = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(args, dict):
        return []
    return [ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=obj["name"],
                     arguments=json.dumps(args, ensure_ascii=False))]


class Watch:
    """Text for tool_choice "auto", token by token: what can be shown now, and whether
    the model has opened a tool call (everything from `<tool_call>` on is the call).

    Held back: a tail that could be the start of `<tool_call>`, and, when the answer
    opens like JSON (`{` or a ``` fence, after whitespace), all of it until the end,
    where `recover` decides whether it was a call."""

    def __init__(self) -> None:
        self.held = ""
        self.shown = False      # some text went out: a JSON answer can no longer start

    def push(self, text: str) -> tuple[str, str | None]:
        """(text to show now, the call text when `<tool_call>` was just opened, else None)."""
        held = self.held + text
        i = held.find(OPEN)
        if i >= 0:
            self.held = ""
            return held[:i], held[i:]
        if not self.shown:
            lead = held.lstrip()
            if any(c.startswith(lead) or lead.startswith(c) for c in _JSON_OPENINGS):
                self.held = held
                return "", None
        keep = next((k for k in range(min(len(OPEN) - 1, len(held)), 0, -1)
                     if held.endswith(OPEN[:k])), 0)
        self.held = held[len(held) - keep:] if keep else ""
        out = held[:len(held) - keep]
        self.shown = self.shown or bool(out)
        return out, None

    def rest(self) -> str:
        """What is still held, at the end."""
        held, self.held = self.held, ""
        return held
