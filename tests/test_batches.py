"""The Batch API with the official openai client: files.create + batches.create, poll to
completed, output lines that match the input, cancel, kill -9 and resume, bad lines
reported, files private to their key."""

from __future__ import annotations

import json
import signal
import time

import httpx
import openai
import pytest

from tests.procs import MeshNode, run_cli

CHAT = "smollm2-135m-instruct"
POLL_S = 0.25


def _lines(n: int, *, max_tokens: int = 8, bad: dict[int, str] | None = None) -> bytes:
    out = []
    for i in range(n):
        if bad and i in bad:
            out.append(bad[i])
            continue
        out.append(json.dumps({"custom_id": f"req-{i}", "method": "POST",
                               "url": "/v1/chat/completions",
                               "body": {"model": CHAT, "max_tokens": max_tokens, "temperature": 0,
                                        "messages": [{"role": "user",
                                                      "content": f"Count to {i % 7 + 2}."}]}}))
    return ("\n".join(out) + "\n").encode()


def _wait(client, bid: str, until, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while True:
        b = client.batches.retrieve(bid)
        if until(b):
            return b
        assert time.monotonic() < deadline, f"batch stuck: {b.status} {b.request_counts}"
        time.sleep(POLL_S)     # polling is what a Batch API client does


def _output(client, file_id: str) -> list[dict]:
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def _chat_model(node) -> dict:
    """SmolLM2's entry in the node's /mesh/status (slots, busy, queued)."""
    return {m["id"]: m for n in httpx.get(node.api + "/mesh/status").json()["nodes"]
            for m in n["models"]}[CHAT]


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    n = MeshNode(tmp_path_factory.mktemp("batch") / "home",
                 ["--model", CHAT, "--no-mdns", "--name", "b"],
                 env={"MESH_LOG_LEVEL": "DEBUG"}).start().wait_ready()   # the worker's log
    yield n
    n.stop()


@pytest.fixture
def client(node):
    return openai.OpenAI(base_url=node.v1, api_key="unused", max_retries=0, timeout=60)


def test_fifty_chat_lines_complete_with_matching_custom_ids(client) -> None:
    f = client.files.create(file=("in.jsonl", _lines(50)), purpose="batch")
    assert f.purpose == "batch" and f.bytes > 0 and f.id.startswith("file-")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                              completion_window="24h", metadata={"job": "fifty"})
    assert b.status in ("validating", "in_progress") and b.metadata == {"job": "fifty"}
    b = _wait(client, b.id, lambda b: b.status in ("completed", "failed"))
    assert b.status == "completed", b.errors
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (50, 50, 0)
    assert b.completed_at >= b.in_progress_at >= b.created_at and b.error_file_id is None
    out = _output(client, b.output_file_id)
    assert [x["custom_id"] for x in out] == [f"req-{i}" for i in range(50)]
    for x in out:
        assert x["response"]["status_code"] == 200 and x["error"] is None
        body = openai.types.chat.ChatCompletion.model_validate(x["response"]["body"])
        assert body.choices[0].message.content and body.usage.completion_tokens <= 8
    assert b.id in [x.id for x in client.batches.list(limit=100)]


def test_greedy_lines_answer_as_the_interactive_route_does(client) -> None:
    f = client.files.create(file=("in.jsonl", _lines(3)), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    b = _wait(client, b.id, lambda b: b.status == "completed")
    for x in _output(client, b.output_file_id):
        i = int(x["custom_id"].split("-")[1])
        alone = client.chat.completions.create(
            model=CHAT, max_tokens=8, temperature=0,
            messages=[{"role": "user", "content": f"Count to {i % 7 + 2}."}])
        assert x["response"]["body"]["choices"][0]["message"]["content"] == \
            alone.choices[0].message.content


def test_a_responses_batch(client) -> None:
    data = "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/responses",
                               "body": {"model": CHAT, "input": f"Say {i}.", "max_output_tokens": 16,
                                        "store": False}}) + "\n" for i in range(2))
    f = client.files.create(file=("r.jsonl", data.encode()), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/responses",
                              completion_window="24h")
    b = _wait(client, b.id, lambda b: b.status in ("completed", "failed"))
    assert b.status == "completed" and b.request_counts.completed == 2, b
    for x in _output(client, b.output_file_id):
        r = openai.types.responses.Response.model_validate(x["response"]["body"])
        assert r.object == "response" and r.output_text


def test_a_batch_with_three_bad_lines_fails_validation_naming_them(client) -> None:
    bad = {2: "{not json", 5: json.dumps({"custom_id": "req-0", "method": "POST",
                                          "url": "/v1/chat/completions",
                                          "body": {"model": CHAT, "messages": []}}),
           7: json.dumps({"custom_id": "x7", "method": "POST", "url": "/v1/chat/completions",
                          "body": {"model": "no-such-model", "messages": []}})}
    f = client.files.create(file=("bad.jsonl", _lines(9, bad=bad)), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    b = _wait(client, b.id, lambda b: b.status in ("failed", "completed"))
    assert b.status == "failed" and b.failed_at
    errs = {e.line: e.code for e in b.errors.data}
    assert errs == {3: "invalid_json_line", 6: "duplicate_custom_id", 8: "model_not_found"}


def test_lines_that_fail_go_to_the_error_file(client) -> None:
    line = json.dumps({"custom_id": "too-long", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": CHAT, "max_tokens": 4, "messages": [
                           {"role": "user", "content": "hi"}], "best_of": 3}})
    f = client.files.create(file=("e.jsonl", _lines(2) + line.encode() + b"\n"), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    b = _wait(client, b.id, lambda b: b.status == "completed")
    assert (b.request_counts.completed, b.request_counts.failed) == (2, 1)
    (err,) = _output(client, b.error_file_id)
    assert err["custom_id"] == "too-long" and err["response"]["status_code"] == 400
    assert "error" in err["response"]["body"]
    assert [x["custom_id"] for x in _output(client, b.output_file_id)] == ["req-0", "req-1"]


def test_cancel_mid_way_keeps_only_finished_lines(client) -> None:
    f = client.files.create(file=("c.jsonl", _lines(60, max_tokens=48)), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    _wait(client, b.id, lambda b: b.request_counts.completed >= 3)
    c = client.batches.cancel(b.id)
    assert c.status in ("cancelling", "cancelled")
    b = _wait(client, b.id, lambda b: b.status == "cancelled")
    assert b.cancelled_at and 3 <= b.request_counts.completed < 60
    done = _output(client, b.output_file_id)
    assert len(done) == b.request_counts.completed
    assert all(x["response"]["status_code"] == 200 for x in done)
    never = _output(client, b.error_file_id)
    assert {x["error"]["code"] for x in never} == {"batch_cancelled"}
    assert sorted(x["custom_id"] for x in done + never) == sorted(f"req-{i}" for i in range(60))
    with pytest.raises(openai.ConflictError):      # a finished batch cannot be cancelled
        client.batches.cancel(_done_batch(client))


def _done_batch(client) -> str:
    f = client.files.create(file=("d.jsonl", _lines(1)), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    return _wait(client, b.id, lambda b: b.status == "completed").id


def test_batch_lines_leave_a_slot_free_for_interactive_requests(client, node) -> None:
    slots = _chat_model(node)["slots"]
    f = client.files.create(file=("s.jsonl", _lines(16, max_tokens=40)), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    seen, served = set(), None
    while (b := client.batches.retrieve(b.id)).status not in ("completed", "failed"):
        m = _chat_model(node)
        if served is None:               # busy counts our own request once it is sent
            seen.add(m["busy"])
        if served is None and m["busy"] == slots - 1:   # at its width: one slot is free
            served = client.chat.completions.create(model=CHAT, max_tokens=4, messages=[
                {"role": "user", "content": "hi"}])
        time.sleep(POLL_S)
    assert b.status == "completed" and max(seen) == slots - 1, seen
    assert served is not None and served.choices[0].message.content


def test_interactive_requests_cut_a_batch_step_short_and_change_no_answer(client, node) -> None:
    """A chat sent while only batch lines run aborts their step (node/backends/batching.py,
    "A step"); the aborted step is redone, so every greedy line still answers what it
    answers alone."""
    n = 6
    alone = [client.chat.completions.create(
        model=CHAT, max_tokens=24, temperature=0,
        messages=[{"role": "user", "content": f"Count to {i % 7 + 2}."}]).choices[0].message.content
        for i in range(n)]
    f = client.files.create(file=("p.jsonl", _lines(n, max_tokens=24)), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    chats = 0
    while (b := client.batches.retrieve(b.id)).status not in ("completed", "failed"):
        if b.status == "in_progress" and chats < 6:
            r = client.chat.completions.create(model=CHAT, max_tokens=2, messages=[
                {"role": "user", "content": f"Say {chats}."}])
            assert r.choices[0].message.content
            chats += 1
        else:
            time.sleep(POLL_S)
    assert b.status == "completed" and chats, (b.status, chats)
    out = _output(client, b.output_file_id)
    assert [x["response"]["body"]["choices"][0]["message"]["content"] for x in out] == alone
    assert "a step of batch lines was aborted for an interactive request" in node.log_tail(10**7)


def test_a_chat_sent_during_a_batch_finds_its_prompt_cached(client, node) -> None:
    """The slot a batch leaves free is the one the latest chat used (node/backends/
    batching.py, "Prompt cache"), so the next turn of that conversation, sent while batch
    lines fill every other slot, reads only its last prompt token again."""
    slots = _chat_model(node)["slots"]
    turn = [{"role": "system", "content": "You are a terse assistant for a team that shares "
             "a few machines on one local network. Answer in one short sentence."},
            {"role": "user", "content": "Which machine should run the nightly job?"}]
    warm = client.chat.completions.create(model=CHAT, max_tokens=4, temperature=0, messages=turn)
    assert warm.usage.prompt_tokens > 30
    f = client.files.create(file=("c.jsonl", _lines(3 * slots, max_tokens=40)), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    during = []
    while (b := client.batches.retrieve(b.id)).status not in ("completed", "failed"):
        busy = _chat_model(node)["busy"]
        if busy == slots - 1 and len(during) < 3:          # lines in every other slot
            r = client.chat.completions.create(model=CHAT, max_tokens=4, temperature=0,
                                               messages=turn)
            if client.batches.retrieve(b.id).status == "in_progress":
                during.append((r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens))
        time.sleep(POLL_S)
    assert b.status == "completed" and during, (b.status, during)
    assert all(cached == prompt - 1 for prompt, cached in during), during


def test_the_cli_lists_follows_and_downloads_a_batch(client, node, tmp_path) -> None:
    f = client.files.create(file=("cli.jsonl", _lines(4)), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    r = run_cli("batches", "show", b.id, "--follow", "--url", node.api, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{b.id}: completed, 4/4 (0 failed)" in r.stdout
    r = run_cli("batches", "list", "--json", "--url", node.api)
    assert b.id in [x["id"] for x in json.loads(r.stdout)]
    out = tmp_path / "out.jsonl"
    r = run_cli("batches", "download", b.id, "-o", str(out), "--url", node.api)
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["custom_id"] for x in out.read_text().splitlines()] == \
        [f"req-{i}" for i in range(4)]
    r = run_cli("batches", "download", b.id, "--errors", "--url", node.api)
    assert r.returncode == 1 and "has no error file" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("batches", "cancel", "batch_nope", "--url", node.api)
    assert r.returncode == 1 and "404" in r.stderr


def test_bad_requests_are_400s_naming_the_field(client) -> None:
    f = client.files.create(file=("u.jsonl", b'{"a": 1}\n'), purpose="user_data")
    with pytest.raises(openai.BadRequestError) as ei:
        client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    assert ei.value.body["param"] == "input_file_id"
    with pytest.raises(openai.BadRequestError) as ei:
        client.batches.create(input_file_id=f.id, endpoint="/v1/moderations",  # type: ignore
                              completion_window="24h")
    assert ei.value.body["param"] == "endpoint"
    with pytest.raises(openai.BadRequestError) as ei:
        client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                              completion_window="1h")
    assert ei.value.body["param"] == "completion_window"
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions",
                              completion_window="24h")
    with pytest.raises(openai.BadRequestError) as ei:
        client.files.create(file=("x.jsonl", b"{}"), purpose="fine-tune")
    assert ei.value.body["param"] == "purpose"
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")


def test_kill_9_mid_batch_resumes_without_redoing_lines(tmp_path) -> None:
    home = tmp_path / "home"
    args = ["--model", CHAT, "--no-mdns", "--name", "k"]
    n = MeshNode(home, args).start().wait_ready()
    try:
        c = openai.OpenAI(base_url=n.v1, api_key="unused", max_retries=0, timeout=60)
        f = c.files.create(file=("k.jsonl", _lines(40, max_tokens=24)), purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                             completion_window="24h")
        before = _wait(c, b.id, lambda b: b.request_counts.completed >= 5).request_counts.completed
    finally:
        n.stop(sig=signal.SIGKILL)
    restarted = time.time()
    n = MeshNode(home, args).start().wait_ready()
    try:
        c = openai.OpenAI(base_url=n.v1, api_key="unused", max_retries=0, timeout=60)
        b = _wait(c, b.id, lambda b: b.status == "completed")
        assert b.request_counts.completed == 40 and b.request_counts.total == 40
        out = _output(c, b.output_file_id)
        ids = [x["custom_id"] for x in out]
        assert ids == [f"req-{i}" for i in range(40)]          # each line once, in order
        # the lines finished before the kill kept their first answer: not run again
        # (created is a whole second taken before the kill, so <= the kill's float time;
        # a line run again was created after the new node started, seconds later)
        early = [x for x in out if x["response"]["body"]["created"] <= restarted]
        assert len(early) >= before >= 5
    finally:
        n.stop()


def test_another_key_cannot_see_a_file_or_a_batch(tmp_path) -> None:
    n = MeshNode(tmp_path / "home", ["--model", CHAT, "--no-mdns", "--name", "kk"]).start().wait_ready()
    try:
        def key(name, features, admin=None):
            r = run_cli("keys", "create", "--name", name, "--features", features, "--url", n.api,
                        *(["--key", admin] if admin else []))
            assert r.returncode == 0, r.stderr
            return r.stdout.strip().splitlines()[-1].split()[-1]
        admin = key("owner", "admin")
        alice = openai.OpenAI(base_url=n.v1, api_key=key("alice", "batch,chat", admin), max_retries=0)
        bob = openai.OpenAI(base_url=n.v1, api_key=key("bob", "batch,chat", admin), max_retries=0)
        chat_only = openai.OpenAI(base_url=n.v1, api_key=key("carol", "chat", admin), max_retries=0)
        f = alice.files.create(file=("a.jsonl", _lines(2)), purpose="batch")
        assert alice.files.retrieve(f.id).id == f.id
        for call in (lambda: bob.files.retrieve(f.id), lambda: bob.files.content(f.id),
                     lambda: bob.files.delete(f.id),
                     lambda: bob.batches.create(input_file_id=f.id, completion_window="24h",
                                                endpoint="/v1/chat/completions")):
            with pytest.raises(openai.NotFoundError):
                call()
        assert f.id not in [x.id for x in bob.files.list()]
        with pytest.raises(openai.PermissionDeniedError):
            chat_only.files.list()
        b = alice.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                 completion_window="24h")
        with pytest.raises(openai.NotFoundError):
            bob.batches.retrieve(b.id)
        b = _wait(alice, b.id, lambda b: b.status == "completed")
        assert len(_output(alice, b.output_file_id)) == 2
        with pytest.raises(openai.NotFoundError):
            bob.files.content(b.output_file_id)
        assert alice.files.delete(f.id).deleted
        with pytest.raises(openai.NotFoundError):
            alice.files.retrieve(f.id)
    finally:
        n.stop()


def test_lines_spread_over_two_nodes_and_move_when_one_dies(tmp_path) -> None:
    token = run_cli("token").stdout.strip()
    a = MeshNode(tmp_path / "a", ["--name", "a", "--token", token, "--no-mdns",
                                  "--model", CHAT]).start()
    addr = a.wait_for(r"mesh: p2p (/ip4/127\.0\.0\.1/\S+)").group(1)
    a.wait_ready()
    b = MeshNode(tmp_path / "b", ["--name", "b", "--token", token, "--no-mdns",
                                  "--model", CHAT, "--peer", addr]).start().wait_ready()
    try:
        c = openai.OpenAI(base_url=a.v1, api_key="unused", max_retries=0, timeout=60)
        f = c.files.create(file=("m.jsonl", _lines(40, max_tokens=24)), purpose="batch")
        # the file is readable from the other node, which the id names
        cb = openai.OpenAI(base_url=b.v1, api_key="unused", max_retries=0, timeout=60)
        assert cb.files.content(f.id).content == _lines(40, max_tokens=24)
        job = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                               completion_window="24h")
        served_by_b = lambda: sum(  # noqa: E731
            1 for n in httpx.get(a.api + "/mesh/status").json()["nodes"] if n["name"] == "b"
            for m in n["models"] if m["busy"] > 0)
        deadline = time.monotonic() + 120
        while not served_by_b():                  # b takes lines too
            assert time.monotonic() < deadline, "no line went to node b"
            time.sleep(POLL_S)
        assert cb.batches.retrieve(job.id).status == "in_progress"   # readable from b
        b.stop(sig=signal.SIGKILL)
        done = _wait(c, job.id, lambda x: x.status in ("completed", "failed"))
        assert done.status == "completed" and done.request_counts.completed == 40, \
            done.request_counts
        out = _output(c, done.output_file_id)
        assert sorted(x["custom_id"] for x in out) == sorted(f"req-{i}" for i in range(40))
        assert {x["response"]["status_code"] for x in out} == {200}
    finally:
        b.stop()
        a.stop()
