"""Agents on a mesh of three `mesh up` processes (a serves the models, b and c none):
an MCP tool's datum in the answer, a webhook run's steps streamed while it runs, a URL
off the allow-list refused, a 2 s job run once per tick across the nodes and taken over
after kill -9, API keys and the `agents` feature; placement's rules as pure functions."""

from __future__ import annotations

import json
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

from node.agents.placement import CLAIM_WAIT_S, Replica, decide, rank
from node.agents.spec import Schedule, next_tick, url_within
from tests.procs import REPO, MeshNode, run_cli

QWEN = "qwen2.5-coder-0.5b-instruct"     # calls tools
SMOL = "smollm2-135m-instruct"
MOTD = "The message of the day: tulips bloom at noon."


def until(fn, ok=bool, timeout=60.0, interval=0.2):
    """fn() until ok(its value), as a user polls an API; the value, None at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = fn()
            if ok(value):
                return value
        except (httpx.HTTPError, AssertionError, KeyError):
            pass
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)


class Site:
    """A web site for http_get: /public/motd.txt (held while `gate` is set), 404 elsewhere;
    every path asked is kept."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.gate: threading.Event | None = None
        self.asked = threading.Event()
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                site.paths.append(self.path)
                site.asked.set()
                if self.path != "/public/motd.txt":
                    self.send_error(404)
                    return
                if site.gate is not None:
                    site.gate.wait(120)
                body = MOTD.encode()
                self.send_response(200)
                self.send_header("content-type", "text/plain")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def site():
    s = Site()
    yield s
    s.server.shutdown()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, site):
    tmp = tmp_path_factory.mktemp("agents")
    token = run_cli("token").stdout.strip()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    a_addr = f"/ip4/127.0.0.1/tcp/{port}"
    docs = tmp / "shared" / "docs"
    docs.mkdir(parents=True)
    (docs / "plan.txt").write_text("Project Heron ships on March 3rd.\n")
    (tmp / "shared" / "secret.txt").write_text("top secret\n")
    (docs / "link.txt").symlink_to(tmp / "shared" / "secret.txt")
    nodes = {}
    for name, models in (("a", ["--model", QWEN, "--model", SMOL]), ("b", ["--no-models"]),
                         ("c", ["--no-models"])):
        home = tmp / name
        home.mkdir()
        (home / "config.yaml").write_text(yaml.safe_dump({
            "mcp_servers": {"weather": {"command": sys.executable,
                                        "args": [str(REPO / "tests" / "mcp_server.py")],
                                        "env": {"MCP_CALLS_LOG": str(tmp / f"{name}-calls.log")}}},
            "agent_http_prefixes": [site.url + "/"], "agent_read_dirs": [str(tmp / "shared")]}))
        peer = ["--p2p-port", str(port)] if name == "a" else ["--peer", a_addr]
        nodes[name] = MeshNode(home, ["--name", name, "--token", token, "--no-mdns", *peer,
                                      *models]).start()
    for n in nodes.values():
        n.wait_ready()
    for n in nodes.values():
        assert until(lambda n=n: {x["name"] for x in httpx.get(
            n.api + "/mesh/status", timeout=5).json()["nodes"] if x["state"] == "alive"}
            == {"a", "b", "c"}), n.log_tail()
    nodes["tmp"] = tmp
    yield nodes
    for name in ("a", "b", "c"):
        nodes[name].stop()
    for name in ("a", "b", "c"):
        assert "Traceback" not in nodes[name].log_tail(10**7), nodes[name].log_tail()


def cli(*args, node, timeout=300):
    r = run_cli("agents", *args, "--url", node.api, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def api(node, method, path, **kw):
    return httpx.request(method, node.v1 + path, timeout=60, **kw)


def create(node, spec, tmp: Path) -> dict:
    f = tmp / f"{spec['name']}.yaml"
    f.write_text(yaml.safe_dump(spec))
    return json.loads(cli("create", str(f), "--json", node=node))


def replicated(mesh, name):
    for n in ("a", "b", "c"):
        assert until(lambda n=n: api(mesh[n], "GET", f"/agents/{name}").status_code == 200)


WEATHER = {"name": "weather", "model": QWEN, "temperature": 0, "tool_choice": "required",
           "instructions": "You answer questions about the weather. Look the answer up "
                           "with your tools, then answer in one sentence.",
           "tools": {"mcp": [{"server": "weather", "tools": ["temperature"]}]},
           "limits": {"max_steps": 2, "max_tokens": 300, "deadline_s": 240}}


def test_an_agent_answers_with_its_mcp_tool(mesh):
    a, b, c = mesh["a"], mesh["b"], mesh["c"]
    made = create(b, WEATHER, mesh["tmp"])
    assert made["rev"] == 1 and set(made["runnable_on"]) == {"a", "b", "c"}
    replicated(mesh, "weather")
    run_id = cli("run", "weather", "--input", "What is the temperature in Oslo today?",
                 node=c).strip()
    assert run_id.startswith("run_")
    # followed from b while c runs it (c holds the run; the model is a's)
    log = cli("logs", "weather", run_id, "--follow", node=b)
    assert "tool temperature(" in log and "23.5" in log and f"run {run_id} completed on c" in log
    run = api(a, "GET", f"/agents/weather/runs/{run_id}").json()
    assert run["status"] == "completed" and run["node"] == "c" and run["trigger"] == "webhook"
    assert "23.5" in run["output"], run
    assert run["usage"]["completion_tokens"] > 0 and run["ended_at"] >= run["started_at"]
    steps = api(a, "GET", f"/agents/weather/runs/{run_id}/steps").json()["data"]
    assert [s["type"] for s in steps] == ["model", "tool", "model"]
    first, tool, last = steps
    assert first["tools"] == ["temperature"] and first["node"] == "a"   # wipe_station withheld
    (call,) = first["tool_calls"]
    assert call["name"] == "temperature" and json.loads(call["arguments"])["city"].lower() == "oslo"
    assert tool["name"] == "temperature" and "23.5" in tool["output"] and not tool["refused"]
    assert tool["server"] == "weather" and last["tools"] == [] and "23.5" in last["text"]
    calls = [json.loads(x) for x in (mesh["tmp"] / "c-calls.log").read_text().splitlines()]
    assert [x["arguments"]["city"].lower() for x in calls] == ["oslo"]
    assert not (mesh["tmp"] / "a-calls.log").exists() and not (mesh["tmp"] / "b-calls.log").exists()


def fetcher(site) -> dict:
    return {"name": "fetcher", "model": QWEN, "temperature": 0, "tool_choice": "required",
            "instructions": "You read web pages for the user with your tools, then answer in "
                            "one sentence.",
            "tools": {"http_get": {"allow": [site.url + "/public/"]}},
            "limits": {"max_steps": 2, "max_tokens": 300, "deadline_s": 240}}


def sse(response):
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


def test_a_webhook_runs_steps_stream_while_it_runs(mesh, site):
    a, b, c = mesh["a"], mesh["b"], mesh["c"]
    assert api(a, "POST", "/agents", json=fetcher(site)).status_code == 201
    replicated(mesh, "fetcher")
    site.gate, site.asked = threading.Event(), threading.Event()
    seen = []
    try:
        with httpx.stream("POST", b.v1 + "/agents/fetcher/runs", timeout=300, json={
                "input": f"What does the page {site.url}/public/motd.txt say?",
                "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = sse(r)
            start = next(events)
            assert start["object"] == "agent.run" and start["status"] == "running"
            model = next(events)
            assert model["type"] == "model" and model["tool_calls"][0]["name"] == "http_get"
            # the tool is held by the site: the run is still going, its first step is out
            assert site.asked.wait(60)
            now = api(c, "GET", f"/agents/fetcher/runs/{start['id']}").json()
            assert now["status"] == "running" and now["node"] == "b"
            site.gate.set()
            seen = [start, model, *events]
    finally:
        site.gate.set()
        site.gate = None
    *steps, end = seen[1:]
    assert [s["type"] for s in steps] == ["model", "tool", "model"]
    assert steps[1]["name"] == "http_get" and MOTD in steps[1]["output"] and steps[1]["status"] == 200
    assert end["object"] == "agent.run" and end["status"] == "completed", end
    assert "tulips" in end["output"].lower()
    stored = api(a, "GET", f"/agents/fetcher/runs/{end['id']}/steps").json()["data"]
    assert stored == steps


def test_a_url_off_the_allow_list_is_refused_and_the_run_says_why(mesh, site):
    a = mesh["a"]
    replicated(mesh, "fetcher")
    before = len(site.paths)
    out = cli("run", "fetcher", "--wait", "--json", "--input",
              f"Fetch {site.url}/secret/data and tell me what it says.", node=a)
    events = [json.loads(x) for x in out.splitlines()]
    run = events[-1]
    assert run["object"] == "agent.run" and run["status"] == "completed"
    steps = api(a, "GET", f"/agents/fetcher/runs/{run['id']}/steps").json()["data"]
    tools = [s for s in steps if s["type"] == "tool"]
    assert tools and all(s["refused"] for s in tools), tools
    url = json.loads(tools[0]["arguments"])["url"]
    assert not url.startswith(site.url + "/public/")
    assert tools[0]["error"] == (f"{url} is not on this agent's allow-list of URL prefixes "
                                 f"({site.url}/public/)")
    assert tools[0]["output"].startswith("refused: ")
    assert site.paths[before:] == []               # the site was never asked


def test_an_agent_reads_its_folder_and_asks_another_agent(mesh):
    a, docs = mesh["a"], mesh["tmp"] / "shared" / "docs"
    for spec in ({"name": "reader", "model": QWEN, "temperature": 0, "tool_choice": "required",
                  "instructions": "You answer questions about the project's files. Read them "
                                  "with your tools, then answer in one sentence.",
                  "tools": {"read_file": {"allow": [str(docs)]}},
                  "limits": {"max_steps": 2, "max_tokens": 200}},
                 {"name": "boss", "model": QWEN, "temperature": 0, "tool_choice": "required",
                  "instructions": "You delegate every question to the agent named reader.",
                  "tools": {"agents": ["reader"]}, "limits": {"max_steps": 2, "max_tokens": 120}}):
        assert api(a, "POST", "/agents", json=spec).status_code == 201

    def run(name, text):
        r = run_cli("agents", "run", name, "--wait", "--json", "--input", text, "--url", a.api,
                    timeout=300)
        events = [json.loads(x) for x in r.stdout.splitlines()]
        assert events and events[-1]["object"] == "agent.run", r.stdout + r.stderr
        return events[-1], [e for e in events if e.get("object") == "agent.run.step"]

    read, steps = run("reader", f"Read the file {docs}/plan.txt and tell me when Project Heron ships.")
    tool = next(s for s in steps if s["type"] == "tool")
    assert tool["name"] == "read_file" and "March 3rd" in tool["output"] and not tool["refused"]
    assert read["status"] == "completed" and "March" in read["output"], read
    # a link out of the folder is refused: the file's text never reaches the model
    read, steps = run("reader", f"What is in {docs}/link.txt?")
    tool = next(s for s in steps if s["type"] == "tool")
    assert tool["refused"] and tool["error"].endswith(f"is not in this agent's folders ({docs})")
    assert "top secret" not in json.dumps(steps) + json.dumps(read)

    boss, steps = run("boss", "When does Project Heron ship? The plan is in plan.txt.")
    call = next(s for s in steps if s["type"] == "tool")
    assert call["name"] == "call_agent" and json.loads(call["arguments"])["agent"] == "reader"
    child = api(a, "GET", f"/agents/reader/runs/{call['run_id']}").json()
    assert child["trigger"] == "agent" and child["parent_run"] == boss["id"]
    assert child["status"] == call["status"] and child["node"] == "a"
    if child["status"] == "completed":
        assert call["output"] == child["output"] and not call["error"]


def ticks(node, name="ticker") -> list[dict]:
    r = api(node, "GET", f"/agents/{name}/runs?limit=100")
    assert r.status_code == 200, r.text
    return r.json()["data"]


def at(runs, t):
    return [x for x in runs if abs(x["scheduled_at"] - t) < 1e-3]


def consecutive(runs) -> list[float]:
    """The ticks run, each once, 2 s apart with none missing."""
    times = sorted(x["scheduled_at"] for x in runs)
    assert len(set(times)) == len(times), f"a tick ran twice: {times}"
    assert all(abs(y - x - 2) < 1e-3 for x, y in zip(times, times[1:])), f"a tick was lost: {times}"
    return times


def test_a_job_runs_once_per_tick_across_three_nodes_and_survives_kill_9(mesh):
    a, b, c = mesh["a"], mesh["b"], mesh["c"]
    r = api(c, "POST", "/agents", json={
        "name": "ticker", "model": SMOL, "temperature": 0, "schedule": {"every": 2, "input": "Hi"},
        "limits": {"max_steps": 1, "max_tokens": 4}})
    assert r.status_code == 201, r.text
    replicated(mesh, "ticker")
    # where the next ticks go, once every node has said from when it takes them
    plan = until(lambda: api(a, "GET", "/agents/ticker").json()["next_runs"],
                 lambda nxt: len(nxt[-1]["nodes"]) == 3)
    assert plan, api(a, "GET", "/agents/ticker").json()
    first = {round(n["at"], 3): n["nodes"][0] for n in plan if len(n["nodes"]) == 3}

    done = until(lambda: [x for x in ticks(a) if x["ended_at"]], lambda got: len(got) >= 5, 90)
    assert done, ticks(a)
    consecutive(done)
    for x in done:
        assert x["trigger"] == "schedule" and x["status"] in ("completed", "incomplete"), x
        if round(x["scheduled_at"], 3) in first:        # the node ranked first ran it
            assert x["node"] == first[round(x["scheduled_at"], 3)], (x, plan)
    assert {round(x["scheduled_at"], 3) for x in done} & set(first)    # some were planned

    # the next tick b or c ranks first for: kill that node once the tick before it is
    # over and every other node has seen it done (a result never heard is run again)
    def victim():
        for n in api(a, "GET", "/agents/ticker").json()["next_runs"]:
            if n["nodes"][0] in ("b", "c") and len(n["nodes"]) == 3 and n["at"] - time.time() > 1:
                return n
    def seen_done(node, t):
        return any(x["state"] == "done" and abs(x["at"] - t) < 1e-3
                   for x in api(node, "GET", "/agents/ticker").json()["recent_ticks"])

    for _ in range(5):           # on a busy machine a tick may come before all that
        target = until(victim, timeout=30)
        assert target
        name = target["nodes"][0]
        assert all(until(lambda n=n: seen_done(n, target["at"] - 2), timeout=30)
                   for n in (mesh[x] for x in ("a", "b", "c") if x != name))
        if time.time() < target["at"] - 0.3 and all(x["ended_at"] for x in ticks(a)):
            break
    else:
        pytest.fail("no quiet moment before a tick of b or c in 5 tries")
    mesh[name].stop(sig=signal.SIGKILL)
    took = until(lambda: [x for x in at(ticks(a), target["at"]) if x["ended_at"]], timeout=30)
    assert took and [x["node"] for x in took] == [target["nodes"][1]], (took, target)
    assert until(lambda: max(x["scheduled_at"] for x in ticks(a)) > target["at"] + 3,
                      timeout=30)

    mesh[name].start()
    mesh[name].wait_ready()

    def everyone():
        alive = {x["name"] for x in httpx.get(a.api + "/mesh/status").json()["nodes"]
                 if x["state"] == "alive"}
        got = api(a, "GET", "/agents/ticker/runs?limit=100").json()
        return got["data"] if alive == {"a", "b", "c"} and not got["unreachable"] else None
    runs = until(everyone, timeout=30)
    assert runs and not [x for x in runs if x["status"] == "interrupted"], runs
    consecutive(runs)
    assert [x["node"] for x in at(runs, target["at"])] == [target["nodes"][1]]

    assert api(b, "DELETE", "/agents/ticker").json()["deleted"] is True
    for n in ("a", "b", "c"):
        assert until(lambda n=n: api(mesh[n], "GET", "/agents/ticker").status_code == 404)
    gone = time.time()
    time.sleep(4.5)        # two ticks' time: none may start once every node has deleted it
    assert not [x for x in ticks(a) if x["started_at"] > gone]


def test_bad_definitions_and_requests_are_clear_errors(mesh):
    b = mesh["b"]
    for body, param in (({"name": "x"}, "model"), ({"name": "Bad Name", "model": SMOL}, "name"),
                        ({"name": "x", "model": SMOL, "tool": []}, "tool"),
                        ({"name": "x", "model": SMOL, "schedule": {"cron": "nope"}}, "schedule"),
                        ({"name": "x", "model": SMOL, "tools": {"mcp": [{"server": "nope"}]}},
                         "tools")):
        r = api(b, "POST", "/agents", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    r = api(b, "POST", "/agents", json={"name": "x", "model": "no-such-model"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    dup = {"name": "dup", "model": SMOL, "limits": {"max_steps": 1, "max_tokens": 4}}
    assert api(b, "POST", "/agents", json=dup).status_code == 201
    r = api(b, "POST", "/agents", json=dup)
    assert r.status_code == 409 and r.json()["error"]["code"] == "agent_exists"
    r = api(b, "POST", "/agents/dup/runs", json={"input": "hi", "wait": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "wait"
    r = api(b, "GET", "/agents/nope/runs")
    assert r.status_code == 404 and r.json()["error"]["code"] == "agent_not_found"
    bad = mesh["tmp"] / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    r = run_cli("agents", "create", str(bad), "--url", b.api)
    assert r.returncode == 1 and "not valid YAML" in r.stderr and "Traceback" not in r.stderr


def test_agents_need_the_agents_feature_and_run_as_their_owner(mesh):
    a, b = mesh["a"], mesh["b"]
    made = run_cli("keys", "create", "--name", "root", "--features", "admin", "--json",
                   "--url", a.api)
    assert made.returncode == 0, made.stderr
    root = {"Authorization": f"Bearer {json.loads(made.stdout)['key']}"}

    def key(name, features):
        r = httpx.post(a.api + "/mesh/keys", headers=root, json={"name": name, "features": features})
        assert r.status_code == 201, r.text
        return {"Authorization": f"Bearer {r.json()['key']}"}

    chat_only, robot = key("chatter", ["chat"]), key("robot", ["agents"])
    both = key("both", ["agents", "chat"])
    # b holds every key once its listing names them all (before the first arrives, b has
    # no key and lets anyone in, so only the listing says when it is ready)
    names = {"root", "chatter", "robot", "both"}
    listed = lambda: httpx.get(b.api + "/mesh/keys", headers=root, timeout=10)  # noqa: E731
    assert until(lambda: {k["name"] for k in listed().json()["data"]} >= names), listed().text
    r = api(b, "GET", "/agents", headers=chat_only)
    assert r.status_code == 403 and r.json()["error"]["code"] == "feature_not_granted"
    assert api(b, "GET", "/agents").status_code == 401
    spec = {"name": "robot-agent", "model": SMOL, "limits": {"max_steps": 1, "max_tokens": 4}}
    r = api(b, "POST", "/agents", headers=robot, json=spec)
    assert r.status_code == 201 and r.json()["owner"] == "robot", r.text
    assert api(b, "GET", "/agents/robot-agent", headers=both).status_code == 404   # not its own
    assert api(b, "GET", "/agents/robot-agent", headers=root).status_code == 200   # admin sees all
    run = api(b, "POST", "/agents/robot-agent/runs", headers=robot, json={"input": "hi"}).json()
    ended = until(lambda: api(b, "GET", f"/agents/robot-agent/runs/{run['id']}",
                              headers=robot).json(), lambda x: x["status"] != "running")
    assert ended["status"] == "failed"
    assert ended["error"] == ("the API key that owns agent 'robot-agent' ('robot') lacks the "
                              "'chat' feature its model calls need")
    r = api(b, "POST", "/agents", headers=both, json={**spec, "name": "both-agent"})
    assert r.status_code == 201
    run = api(b, "POST", "/agents/both-agent/runs", headers=both, json={"input": "hi"}).json()
    ended = until(lambda: api(b, "GET", f"/agents/both-agent/runs/{run['id']}",
                              headers=both).json(), lambda x: x["status"] != "running")
    assert ended["status"] in ("completed", "incomplete") and ended["output"], ended


# ------------------------------------------------------------ placement, pure
def _r(node, alive=True, ready=0.0, ticks=None):
    return Replica(node, node, alive, ready, ticks or {})


def test_placement_first_alive_in_rank_runs_a_tick_and_the_next_takes_over():
    nodes = ["n1", "n2", "n3"]
    order = rank("job", 10_000, nodes)
    assert sorted(order) == nodes and order == rank("job", 10_000, list(reversed(nodes)))
    first, second, third = order
    everyone = [_r(n) for n in nodes]
    assert decide("job", 10_000, first, everyone, now=10).action == "run"
    wait = decide("job", 10_000, second, everyone, now=10)
    assert wait.action == "wait" and wait.by == first and wait.wake_at == 10 + CLAIM_WAIT_S
    # the first is gone: the second runs it, the third waits for the second
    gone = [_r(first, alive=False), _r(second), _r(third)]
    assert decide("job", 10_000, second, gone, now=10).action == "run"
    assert decide("job", 10_000, third, gone, now=10).by == second
    # it claimed, then died: taken over; a claim by an alive node is waited for
    died = [_r(first, alive=False, ticks={10_000: "running"}), _r(second), _r(third)]
    assert decide("job", 10_000, second, died, now=10).action == "run"
    claimed = [_r(first), _r(second, ticks={10_000: "running"}), _r(third)]
    assert decide("job", 10_000, first, claimed, now=10).action == "wait"
    # done anywhere (even by a node now gone) is done; not ready for that tick: skip
    finished = [_r(first, alive=False, ticks={10_000: "done"}), _r(second), _r(third)]
    assert decide("job", 10_000, second, finished, now=10).action == "done"
    late = [_r(first), _r(second, ready=11.0), _r(third)]
    assert decide("job", 10_000, second, late, now=10).action == "skip"
    # an alive first that never claims: the second runs it after CLAIM_WAIT_S
    assert decide("job", 10_000, second, everyone, now=10 + CLAIM_WAIT_S).action == "run"


def test_schedule_instants_are_the_same_on_every_node():
    every = Schedule(every=2)
    assert next_tick(every, anchor=100.5, after=100.5) == 102.5
    assert next_tick(every, anchor=100.5, after=103.0) == 104.5
    assert next_tick(every, anchor=100.5, after=50.0) == 100.5      # not before its creation
    cron = Schedule(cron="0 7 * * 1-5")                             # 07:00 UTC on weekdays
    friday_noon = 1764936000.0                                      # 2025-12-05 12:00 UTC, a Friday
    assert next_tick(cron, anchor=0, after=friday_noon) == 1765177200.0   # Monday 07:00 UTC
    assert next_tick(Schedule(cron="* * * * * */2"), anchor=0, after=1000.5) == 1002.0


def test_url_allow_lists_compare_parsed_urls():
    allow = ["https://api.example.com/v2/"]
    assert url_within("https://api.example.com/v2/items?id=3", allow)
    assert url_within("https://api.example.com:443/v2/", allow)
    for url in ("https://api.example.com/v1/items", "http://api.example.com/v2/",
                "https://api.example.com:8443/v2/", "https://api.example.com.evil.net/v2/",
                "https://api.example.com@evil.net/v2/", "https://user@api.example.com/v2/",
                "https://api.example.com/v2/../admin", "https://api.example.com/v2/%2e%2e/admin",
                "file:///etc/passwd", "not a url"):
        assert not url_within(url, allow), url
