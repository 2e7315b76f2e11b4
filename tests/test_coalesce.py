"""node/workers.py `coalesced`: a consumer that fell behind its worker gets what piled up
as one Delta (mesh/wire/inference.py `merged`), and nothing is lost, reordered or joined
that must stay apart. Pure trio, no processes."""

from __future__ import annotations

import math

import trio
import trio.testing

from mesh.wire.inference import Delta, Done, Failed, TokenLogprob, ToolCall, merged
from node.workers import coalesced


def _lp(tok: str) -> TokenLogprob:
    return TokenLogprob(token=tok, logprob=-0.5, bytes=tuple(tok.encode()))


async def _drain(events, *, early=()):
    """Push `early` before reading anything (a consumer that is behind), then read all."""
    send, recv = trio.open_memory_channel(math.inf)
    for ev in early:
        send.send_nowait(ev)
    for ev in events:
        send.send_nowait(ev)
    return [ev async for ev in coalesced(recv)]


def test_what_piled_up_is_one_delta_with_every_token_and_logprob() -> None:
    toks = ["Hel", "lo", ",", " wor", "ld"]
    out = trio.run(_drain, [Delta(text=t, logprobs=(_lp(t),)) for t in toks]
                   + [Done(finish_reason="length")])
    assert [type(e) for e in out] == [Delta, Done]
    assert out[0].text == "Hello, world"
    assert [lp.token for lp in out[0].logprobs] == toks
    assert out[1].finish_reason == "length"


def test_a_consumer_that_keeps_up_sees_every_event_as_sent() -> None:
    async def main():
        send, recv = trio.open_memory_channel(math.inf)
        got = []

        async def read():
            async for ev in coalesced(recv):
                got.append(ev)
        async with trio.open_nursery() as n:
            n.start_soon(read)
            for t in ("a", "b", "c"):
                await send.send(Delta(text=t))
                await trio.testing.wait_all_tasks_blocked()    # the reader took it
            await send.send(Done())
        return got
    got = trio.run(main)
    assert [getattr(e, "text", None) for e in got] == ["a", "b", "c", None]


def test_tool_calls_choices_and_a_choices_end_stay_apart() -> None:
    call = ToolCall(id="call_1", name="f", arguments='{"x": 1}')
    events = [Delta(text="a"), Delta(text="b"), Delta(text="", tool_calls=(call,)),
              Delta(text="c"), Delta(text="d", index=1), Delta(text="e", index=1,
                                                             finish_reason="stop"),
              Delta(text="f", index=1), Delta(text="g"), Failed(error="Timeout", message="late"),
              Delta(text="after the end")]
    out = trio.run(_drain, events)
    assert [(type(e).__name__, getattr(e, "text", None), getattr(e, "index", None))
            for e in out] == [("Delta", "ab", 0), ("Delta", "", 0), ("Delta", "c", 0),
                              ("Delta", "de", 1), ("Delta", "f", 1), ("Delta", "g", 0),
                              ("Failed", None, None)]
    assert out[1].tool_calls == (call,) and out[3].finish_reason == "stop"
    assert merged(Delta(text="x"), Done()) is None


def test_a_channel_closed_without_a_terminal_event_ends_the_stream() -> None:
    async def main():
        send, recv = trio.open_memory_channel(math.inf)
        send.send_nowait(Delta(text="x"))
        send.close()
        return [ev async for ev in coalesced(recv)]
    assert [e.text for e in trio.run(main)] == ["x"]


class _Framer:
    def __init__(self) -> None:
        self.sent: list[dict] = []

    def send(self, msg: dict) -> None:
        self.sent.append(msg)


def _kinds(framer: _Framer) -> list[tuple[str, str | None]]:
    return [(m["event"]["kind"], m["event"].get("text")) for m in framer.sent]


def test_a_non_streaming_request_gets_its_text_in_one_frame_at_the_end() -> None:
    from node.worker_main import WorkerServer
    call = ToolCall(id="call_1", name="f", arguments="{}")
    events = [Delta(text="The "), Delta(text="answer", logprobs=(_lp("answer"),)),
              Delta(text="", tool_calls=(call,)), Delta(text=" then"), Delta(text=" more"),
              Done(finish_reason="stop")]
    whole, streamed = _Framer(), _Framer()
    emit_whole = WorkerServer(whole, backend=None)._emitter(1, whole=True)
    emit_stream = WorkerServer(streamed, backend=None)._emitter(1)
    for ev in events:
        emit_whole(ev)
        emit_stream(ev)
    assert _kinds(streamed) == [("delta", "The "), ("delta", "answer"), ("delta", ""),
                                ("delta", " then"), ("delta", " more"), ("done", None)]
    assert _kinds(whole) == [("delta", "The answer"), ("delta", ""), ("delta", " then more"),
                             ("done", None)]
    assert [lp["token"] for lp in whole.sent[0]["event"]["logprobs"]] == ["answer"]
    # a failure after some text: the text goes out first, then the failure
    failed = _Framer()
    emit = WorkerServer(failed, backend=None)._emitter(2, whole=True)
    for ev in (Delta(text="par"), Delta(text="tial"), Failed(error="BackendError", message="x")):
        emit(ev)
    assert _kinds(failed) == [("delta", "partial"), ("failed", None)]
