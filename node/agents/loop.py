"""One run's tool loop: model -> tool calls -> results -> model, until an answer.

Each model step is a typed `Generate` (mesh/wire/inference.py) carrying the agent's tools
and `tool_choice`, opened with `Router.open`, so the model is served by this node's
worker or by any peer that has it, exactly as an API request is. Limits:
- `max_steps` model calls; the last one is offered no tools, so a run ends with an
  answer rather than a dangling call (small models otherwise call the same tool again
  and again after its result);
- `max_tokens` completion tokens over the whole run: each step may generate what is
  left (capped by the node's max_tokens_limit); spent before an answer -> `incomplete`;
- `deadline_s`: the caller runs the loop under that deadline (node/agents/service.py).
`tool_choice: required` forces a call on the first step only; later steps are `auto`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from mesh.errors import MeshError
from mesh.wire.inference import (Delta, Done, Failed, Generate, Message, Sampling, ToolCall,
                                 Usage, error_from_failed)
from node.agents.spec import AgentSpec
from node.agents.tools import ToolBox

__all__ = ["Outcome", "run_loop"]

Record = Callable[[str, float, float, dict[str, Any]], None]     # type, start, end, data


@dataclass(frozen=True)
class Outcome:
    status: str                   # completed | incomplete
    output: str | None
    error: str | None = None


async def _generate(open_call, req: Generate, caller, deadline: float
                    ) -> tuple[str, list[ToolCall], str, Usage, str, bool]:
    call = await open_call(req, caller=caller, deadline=deadline)
    parts: list[str] = []
    calls: list[ToolCall] = []
    try:
        async for ev in call.events():
            if isinstance(ev, Delta):
                parts.append(ev.text)
                calls.extend(ev.tool_calls)
            elif isinstance(ev, Done):
                return ("".join(parts), calls, ev.finish_reason, ev.usage, call.served_by,
                        call.target.peer is None)
            elif isinstance(ev, Failed):
                raise error_from_failed(ev)
    finally:
        await call.aclose()
    raise MeshError("the generation ended without a result")


async def run_loop(spec: AgentSpec, text: str, *, tools: ToolBox,
                   open_call: Callable[..., Awaitable[Any]], caller: dict[str, Any] | None,
                   record: Record, usage: Callable[[int, int], None], token_cap: int,
                   node_name: str, deadline: float) -> Outcome:
    messages = ([Message(role="system", content=spec.instructions)] if spec.instructions
                else []) + [Message(role="user", content=text)]
    lim = spec.limits
    left = lim.max_tokens
    forced = spec.tool_choice == "required"
    sampling = Sampling(temperature=spec.temperature)
    for step in range(1, lim.max_steps + 1):
        offer = tuple(tools.offered) if step < lim.max_steps else ()
        choice = ("required" if forced else "auto") if offer else "none"
        want = min(left, token_cap) if token_cap else left
        if want <= 0:
            return Outcome("incomplete", None, f"the run's token budget (max_tokens "
                           f"{lim.max_tokens}) was spent before a final answer")
        t0 = time.time()
        out, calls, finish, used, served_by, local = await _generate(
            open_call, Generate(model=spec.model, messages=tuple(messages), max_tokens=want,
                                sampling=sampling, tools=offer, tool_choice=choice),
            caller, deadline)
        left -= used.completion_tokens
        usage(used.prompt_tokens, used.completion_tokens)
        record("model", t0, time.time(), {
            "model": spec.model, "node": node_name if local else served_by,
            "tool_choice": choice, "tools": [t.name for t in offer], "text": out,
            "tool_calls": [c.model_dump() for c in calls], "finish_reason": finish,
            "usage": {"prompt_tokens": used.prompt_tokens,
                      "completion_tokens": used.completion_tokens}})
        if not calls:
            if finish == "length":
                return Outcome("incomplete", out, "the answer was cut at the token limit "
                               f"({want} tokens left of max_tokens {lim.max_tokens})")
            return Outcome("completed", out)
        forced = False
        messages.append(Message(role="assistant", content=out, tool_calls=tuple(calls)))
        for c in calls:
            t0 = time.time()
            res = await tools.call(c.name, c.arguments)
            record("tool", t0, time.time(), {"tool_call_id": c.id, "name": c.name,
                                             "arguments": c.arguments, **res.record()})
            messages.append(Message(role="tool", content=res.output, tool_call_id=c.id,
                                    name=c.name))
    # only a last step that called a tool although it was offered none gets here
    return Outcome("incomplete", None, f"max_steps ({lim.max_steps}) reached")
