"""The web dashboard in a real browser (Debian's chromium + chromium-driver, driven by
selenium) on a two-node mesh with an API key: node `a` serves SmolLM2, Qwen2.5-Coder
0.5B (tools) and whisper-tiny.en; node `b` serves nothing and has its own empty models
directory. The browser talks to `b` only, as a user who opened b's address would.

Screenshots of every page go to the test's tmp dir (printed); with
MESH_DASHBOARD_SHOTS=DIR they are also copied to DIR/dashboard-<page>.png (the set in
docs/ was made this way)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import threading
import time

import httpx
import pytest

from tests.procs import MeshNode, run_cli

CHAT = "smollm2-135m-instruct"
QWEN = "qwen2.5-coder-0.5b-instruct"
STT = "whisper-tiny.en"
VOICE = "piper-en-us-joe-medium"

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the [test] extra)")
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (BROWSER and DRIVER),
                                reason="chromium and chromedriver are not installed "
                                       "(scripts/setup.sh installs them as root)")


def until(fn, timeout=30.0, interval=0.2):
    """fn() until truthy (HTTP state another node has to catch up with); its last value."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = fn()
        except httpx.HTTPError:
            value = None
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dash")
    token = run_cli("token").stdout.strip()
    a = MeshNode(tmp / "a", ["--name", "a", "--token", token, "--no-mdns", "--model", CHAT,
                             "--model", QWEN, "--model", STT]).start()
    b = None
    try:
        addr = a.wait_for(r"mesh: p2p (/ip4/127\.0\.0\.1/\S+)").group(1)
        a.wait_ready()
        b = MeshNode(tmp / "b", ["--name", "b", "--token", token, "--no-mdns", "--no-models",
                                 "--models-dir", str(tmp / "b-models"), "--peer", addr]).start()
        b.wait_ready()
        made = run_cli("keys", "create", "--name", "admin", "--features", "admin", "--url", a.api)
        assert made.returncode == 0, made.stderr
        key = made.stdout.split()[-1]
        # the key reaches b by gossip; b then refuses a call without it
        assert until(lambda: httpx.get(b.api + "/dashboard/session").status_code == 401)
        assert until(lambda: {CHAT, QWEN, STT} <= {m["id"] for m in httpx.get(
            b.v1 + "/models", headers={"Authorization": f"Bearer {key}"}).json()["data"]})
        yield {"a": a, "b": b, "key": key, "tmp": tmp}
    finally:
        for n in (b, a):
            if n is not None:
                n.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    d = tmp_path_factory.mktemp("screenshots")
    print(f"dashboard screenshots: {d}")
    return d


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = BROWSER
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=webdriver.ChromeService(DRIVER), options=opts)
    try:
        yield d
        errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"
                  and e["source"] == "javascript"]
        assert not errors, errors       # no uncaught script error in the whole session
    finally:
        d.quit()


def shot(driver, shots, name: str) -> None:
    driver.save_screenshot(str(shots / f"{name}.png"))
    out = os.environ.get("MESH_DASHBOARD_SHOTS")
    if out:
        shutil.copy(shots / f"{name}.png", os.path.join(out, f"dashboard-{name}.png"))


def wait(driver, cond, timeout=60):
    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=(StaleElementReferenceException,)).until(cond)


def css(driver, sel):
    return driver.find_element(By.CSS_SELECTOR, sel)


def sign_in(driver, mesh, tab="mesh") -> None:
    """Open b's dashboard on `tab`, signing in through the form when the tab has no key."""
    driver.get(f"{mesh['b'].api}/#{tab}")
    wait(driver, lambda d: css(d, "#app").is_displayed() or css(d, "#login").is_displayed())
    if css(driver, "#login").is_displayed():
        css(driver, "#login-key").send_keys(mesh["key"])
        css(driver, "#login-submit").click()
        wait(driver, lambda d: css(d, "#app").is_displayed())
    wait(driver, lambda d: css(d, f"#tab-{tab}").is_displayed())


def set_value(driver, sel, value) -> None:
    el = css(driver, sel)
    el.clear()
    el.send_keys(str(value))


# ------------------------------------------------------------------ the page and its door
def test_the_page_is_open_and_every_data_call_needs_the_key(mesh):
    b, key = mesh["b"].api, mesh["key"]
    page = httpx.get(b + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(b + "/ui/app.js").headers["content-type"].startswith("text/javascript")
    missing = httpx.get(b + "/ui/nothing.js")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    up = httpx.get(b + "/ui/%2e%2e/dashboard_routes.py")
    assert up.status_code in (401, 404) and "import" not in up.text
    assert httpx.get(b + "/dashboard/session").status_code == 401
    assert httpx.get(b + "/mesh/events").status_code == 401
    auth = {"Authorization": f"Bearer {key}"}
    me = httpx.get(b + "/dashboard/session", headers=auth).json()
    assert me["caller"]["name"] == "admin" and me["enforcing"] and me["node"] == "b"
    with httpx.stream("GET", b + "/mesh/events", headers=auth, timeout=10) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        data = next(line for line in r.iter_lines() if line.startswith("data: "))
    picture = json.loads(data[6:])
    assert {n["name"] for n in picture["nodes"]} == {"a", "b"} and "rtt" in picture


def test_a_wrong_key_is_refused(browser, mesh, shots):
    browser.get(mesh["b"].api + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    wait(browser, lambda d: css(d, "#login").is_displayed())
    css(browser, "#login-key").send_keys("mk-nosuchkey-0123456789")
    css(browser, "#login-submit").click()
    wait(browser, lambda d: "Incorrect or revoked API key" in css(d, "#login-error").text)
    assert not css(browser, "#app").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('mesh.api_key')") is None
    shot(browser, shots, "login")


# ------------------------------------------------------------------ the mesh, live
def test_the_dashboard_lists_both_nodes_and_their_models(browser, mesh, shots):
    sign_in(browser, mesh, "mesh")
    card = '#mesh-nodes .node-card[data-node="{}"]'
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, card.format("a") + ' .model[data-state="loaded"]')) == 3)
    a = css(browser, card.format("a"))
    assert {m.get_attribute("data-model") for m in a.find_elements(By.CSS_SELECTOR, ".model")} == {CHAT, QWEN, STT}
    assert "alive" in a.text and "RAM" in a.text and "free of" in a.text
    b = css(browser, card.format("b"))
    assert "this node" in b.text and "no models" in b.text
    assert "2 nodes, 2 alive" in css(browser, "#mesh-summary").text
    # slots are drawn per model
    assert len(a.find_elements(By.CSS_SELECTOR, f'.model[data-model="{CHAT}"] .slot')) >= 1
    # RTT of the link, as measured by the nodes (pings every 2 s, then gossiped)
    wait(browser, lambda d: any("ms" in t.text for t in d.find_elements(By.CSS_SELECTOR, ".graph .link-label")))
    # the picture is live: new events keep arriving over the stream
    first = css(browser, "#mesh-summary").get_attribute("data-ts")
    wait(browser, lambda d: css(d, "#mesh-summary").get_attribute("data-ts") != first, timeout=10)
    assert "live" in css(browser, "#live").text
    # a generation running on a shows as a busy slot of its model, then tokens/s
    stop, busy = threading.Event(), f'{card.format("a")} .model[data-model="{CHAT}"]'

    def generate():
        with httpx.stream("POST", mesh["a"].v1 + "/chat/completions", timeout=120,
                          headers={"Authorization": f"Bearer {mesh['key']}"},
                          json={"model": CHAT, "stream": True, "max_tokens": 400,
                                "messages": [{"role": "user", "content": "Tell a long story."}]}) as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    return

    worker = threading.Thread(target=generate, daemon=True)
    worker.start()
    try:
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, busy + " .slot.busy"))
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, busy + " .tps"))
        shot(browser, shots, "mesh")
    finally:
        stop.set()
        worker.join(timeout=130)
    wait(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, busy + " .slot.busy"))


# ------------------------------------------------------------------ chat
def _send(driver, model, text, max_tokens=24):
    set_value(driver, "#chat-model", model)
    set_value(driver, "#chat-max-tokens", max_tokens)
    before = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    css(driver, "#chat-input").send_keys(text)
    css(driver, "#chat-send").click()
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) > before)
    msg = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    wait(driver, lambda d: msg.get_attribute("data-state") != "streaming", timeout=240)
    assert msg.get_attribute("data-state") == "done", msg.text
    return msg


def test_a_chat_streams_an_answer_and_shows_the_serving_node(browser, mesh, shots):
    sign_in(browser, mesh, "chat")
    css(browser, "#chat-clear").click()
    set_value(browser, "#chat-system", "You are a helpful programmer.")
    msg = _send(browser, CHAT, "Write a Python function that adds two numbers.", max_tokens=64)
    assert int(msg.get_attribute("data-chunks")) > 3        # many SSE events, drawn as they came
    assert msg.get_attribute("data-node") == "a"             # b has no model: a served it
    assert "served by a" in msg.find_element(By.CSS_SELECTOR, ".msg-head").text
    assert msg.find_element(By.CSS_SELECTOR, ".msg-body").text.strip()
    assert "tokens in" in msg.find_element(By.CSS_SELECTOR, ".stats").text
    shot(browser, shots, "chat")


def test_json_mode_and_tools_follow_the_model_card(browser, mesh, shots):
    sign_in(browser, mesh, "chat")
    css(browser, "#chat-clear").click()
    set_value(browser, "#chat-system", "")
    set_value(browser, "#chat-model", CHAT)      # no "tools" on its card: no tools panel
    wait(browser, lambda d: "capabilities: chat" in css(d, "#chat-caps").text)
    assert not css(browser, "#chat-tools-row").is_displayed()
    assert css(browser, "#chat-json-row").is_displayed()
    set_value(browser, "#chat-model", QWEN)
    wait(browser, lambda d: css(d, "#chat-tools-row").is_displayed())
    # JSON mode: the answer is a JSON object, drawn as a JSON code block
    css(browser, "#chat-json").click()
    browser.execute_script("const t = document.querySelector('#chat-temperature'); t.value = 0;"
                           "t.dispatchEvent(new Event('input'))")
    assert css(browser, 'output[for="chat-temperature"]').text == "0"
    msg = _send(browser, QWEN, "A JSON object with the keys name and age of Ann, who is 30.",
                max_tokens=60)
    assert msg.get_attribute("data-format") == "json_object"
    code = msg.find_elements(By.CSS_SELECTOR, "code.lang-json")
    assert code, msg.text
    assert isinstance(json.loads(code[0].text), dict)
    css(browser, "#chat-json").click()
    # tools: a required call, its result sent back from the page, then the answer
    css(browser, "#chat-clear").click()
    css(browser, "#chat-tools-on").click()
    css(browser, '#chat-tool-choice option[value="required"]').click()
    msg = _send(browser, QWEN, "What is the weather in Paris, in celsius?", max_tokens=80)
    call = msg.find_element(By.CSS_SELECTOR, '.tool-call[data-tool="get_weather"]')
    assert "paris" in call.find_element(By.CSS_SELECTOR, "pre").text.lower()
    shot(browser, shots, "tools")
    css(browser, '#chat-tool-choice option[value="none"]').click()
    set_value(browser, "#chat-max-tokens", 40)
    call.find_element(By.CSS_SELECTOR, ".tool-result").send_keys('{"temperature": 18, "sky": "sunny"}')
    call.find_element(By.CSS_SELECTOR, "button").click()
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2)
    answer = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    wait(browser, lambda d: answer.get_attribute("data-state") != "streaming", timeout=240)
    assert answer.get_attribute("data-state") == "done", answer.text
    assert answer.find_element(By.CSS_SELECTOR, ".msg-body").text.strip()
    css(browser, "#chat-tools-on").click()


def test_markdown_is_rendered_safely_by_the_page(browser, mesh):
    sign_in(browser, mesh, "chat")
    cases = ["**bold** and *it* and `x<y`", "```python\nif a < b:\n    pass\n```",
             "<script>alert(1)</script><img src=x onerror=alert(1)>",
             "[ok](https://example.org) [bad](javascript:alert(1))",
             "- one\n- two\n  - nested\n\n1. first\n2. second",
             "| a | b |\n|---|--:|\n| 1 | 2 |", "# Title\n> quoted", "```js\nlet streaming = 1"]
    out = browser.execute_async_script(
        "const done = arguments[1];"
        "import('/ui/markdown.js').then(m => done(arguments[0].map(m.render)));", cases)
    assert "<strong>bold</strong>" in out[0] and "<em>it</em>" in out[0]
    assert "<code>x&lt;y</code>" in out[0]
    assert '<code class="lang-python">if a &lt; b:\n    pass</code>' in out[1]
    assert "<script" not in out[2] and "<img" not in out[2] and "&lt;script&gt;" in out[2]
    assert 'href="https://example.org"' in out[3] and "javascript:" not in out[3].split("[bad]")[0]
    assert "href=\"javascript" not in out[3]
    assert out[4].count("<li>") == 5 and "<ul>" in out[4] and "<ol>" in out[4]
    assert "<table>" in out[5] and 'class="al-right"' in out[5]
    assert "<h3>Title</h3>" in out[6] and "<blockquote>" in out[6]
    assert 'class="lang-js">let streaming = 1</code>' in out[7]   # an unclosed fence while streaming


# ------------------------------------------------------------------ gallery
def test_installing_a_model_from_the_page_shows_progress_to_completion(browser, mesh, shots):
    b, auth = mesh["b"], {"Authorization": f"Bearer {mesh['key']}"}
    assert VOICE not in {m["id"] for m in httpx.get(b.api + "/mesh/models", headers=auth).json()["installed"]}
    sign_in(browser, mesh, "gallery")
    row = f'#gallery-list tr[data-model="{VOICE}"]'
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, row + " button.install"))
    css(browser, row + " button.install").click()
    seen = []

    def state(d, want):
        s = css(d, row).get_attribute("data-state")
        if not seen or seen[-1] != s:
            seen.append(s)
        return s in want

    wait(browser, lambda d: state(d, ("downloading", "verifying", "done", "failed")), timeout=120)
    if seen[-1] == "downloading":
        shot(browser, shots, "gallery-progress")
    try:
        wait(browser, lambda d: state(d, ("done", "failed")), timeout=600)
    except TimeoutException:
        pytest.fail(f"the install did not end; states seen: {seen}")
    assert seen[-1] == "done", css(browser, row).text
    assert "downloading" in seen or "verifying" in seen, seen
    # the list is redrawn from the node: the voice is installed on b now, the job's end kept
    wait(browser, lambda d: "installed" in css(d, row).text)
    r = css(browser, row)
    assert r.get_attribute("data-state") == "done" and int(r.get_attribute("data-updates")) >= 2
    assert "from peer:a" in r.text or "from origin" in r.text, r.text     # where it came from
    assert VOICE in {m["id"] for m in httpx.get(b.api + "/mesh/models", headers=auth).json()["installed"]}
    shot(browser, shots, "gallery")


# ------------------------------------------------------------------ transcription
def test_an_audio_file_dropped_on_the_page_is_transcribed(browser, mesh, shots, speech_wav):
    sign_in(browser, mesh, "transcribe")
    wait(browser, lambda d: css(d, "#stt-model").get_attribute("value") == STT)
    data = base64.b64encode(speech_wav.read_bytes()).decode()
    browser.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], 'hello.wav', {type: 'audio/wav'}));
        document.querySelector('#stt-drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
    """, data)
    out = "#stt-result"
    wait(browser, lambda d: css(d, out).get_attribute("data-state") in ("done", "error"), timeout=120)
    assert css(browser, out).get_attribute("data-state") == "done", css(browser, "#stt-note").text
    assert "hello" in css(browser, ".stt-text").text.lower()
    assert css(browser, out).get_attribute("data-node") == "a"
    shot(browser, shots, "transcribe")


# ------------------------------------------------------------------ keys
def test_the_agents_page_shows_the_schedule_runs_one_and_follows_its_steps(browser, mesh, shots):
    auth = {"Authorization": f"Bearer {mesh['key']}"}
    r = httpx.post(mesh["a"].v1 + "/agents", headers=auth, timeout=30, json={
        "name": "greeter", "model": CHAT, "temperature": 0, "description": "says hello",
        "instructions": "Greet the user in one short sentence.",
        "schedule": {"every": 3600, "input": "Hello"}})
    assert r.status_code == 201, r.text
    sign_in(browser, mesh, "agents")
    row = '#agents-list tr[data-agent="greeter"]'
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, row))   # gossiped to b
    text = css(browser, row).text
    assert CHAT in text and "every 3600" in text and "says hello" in text, text
    wait(browser, lambda d: css(d, row + " ul.ticks li"))            # the next ticks, listed
    set_value(browser, row + " .agent-input", "Hi there")
    css(browser, row + " button.run-now").click()
    wait(browser, lambda d: css(d, "#agent-run").get_attribute("data-status") == "completed",
         timeout=120)
    steps = browser.find_elements(By.CSS_SELECTOR, '#agent-run li.step[data-type="model"]')
    assert steps and steps[0].text.strip() != "model", [s.text for s in steps]
    assert "completed on" in css(browser, "#agent-run .note").text
    # the run is listed under the agent, and following it again replays its steps
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, row + " button.run-link"))
    assert "completed" in css(browser, row + " button.run-link").text
    shot(browser, shots, "agents")


def test_the_keys_page_creates_a_key_shows_it_once_and_revokes_it(browser, mesh, shots):
    b = mesh["b"].api
    sign_in(browser, mesh, "keys")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#keys-list tr[data-key="admin"]'))
    set_value(browser, "#keys-name", "viewer")
    css(browser, '#keys-features input[value="models"]').click()     # chat is ticked already
    css(browser, '#keys-form button[type="submit"]').click()
    wait(browser, lambda d: css(d, "#keys-created").is_displayed())
    secret = css(browser, "#keys-created .secret").text
    assert secret.startswith("mk-")
    row = '#keys-list tr[data-key="viewer"]'
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, row) and "live" in css(d, row).text)
    assert "chat, models" in css(browser, row).text
    # the new key works where its features allow, and nowhere else
    viewer = {"Authorization": f"Bearer {secret}"}
    assert httpx.get(b + "/v1/models", headers=viewer).status_code == 200
    assert httpx.get(b + "/mesh/status", headers=viewer).status_code == 403
    # signed in with it, the page shows what the key may not see instead of the mesh
    css(browser, "#logout").click()
    wait(browser, lambda d: css(d, "#login").is_displayed())
    assert browser.execute_script("return sessionStorage.getItem('mesh.api_key')") is None
    css(browser, "#login-key").send_keys(secret)
    css(browser, "#login-submit").click()
    wait(browser, lambda d: css(d, "#app").is_displayed())
    assert css(browser, "#who-name").text == "viewer (chat, models)"
    browser.get(b + "/#mesh")
    wait(browser, lambda d: "needs a key with the admin feature" in css(d, "#mesh-error").text)
    css(browser, "#logout").click()
    sign_in(browser, mesh, "keys")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, row + " button.revoke"))
    css(browser, row + " button.revoke").click()
    wait(browser, EC.alert_is_present(), timeout=5).accept()
    wait(browser, lambda d: "revoked" in css(d, row).text)
    shot(browser, shots, "keys")          # the secret on it is revoked, on a mesh long gone
    assert until(lambda: httpx.get(b + "/v1/models", headers=viewer).status_code == 401)
