"""`mesh up` as a process: readable start-up errors, clean shutdown under load."""

from __future__ import annotations

import signal
import threading

import httpx
import openai
import psutil
import pytest

from tests.procs import MeshNode, run_cli

CHAT = "smollm2-135m-instruct"
NO_EOS = {"0": -100, "2": -100}   # <|endoftext|>, <|im_end|>: the stream outlasts the shutdown


def test_unknown_model_is_one_readable_line(tmp_path):
    r = run_cli("up", "--home", str(tmp_path), "--port", "0", "--model", "smolm2-135m")
    assert r.returncode != 0
    assert "did you mean" in r.stderr and "smollm2-135m-instruct" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bad_flag_value_is_one_readable_line(tmp_path):
    r = run_cli("up", "--home", str(tmp_path), "--port", "99999")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "port" in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_clean_shutdown_under_open_stream(tmp_path, sig):
    node = MeshNode(tmp_path / "n", ["--model", CHAT, "--no-mdns"]).start().wait_ready()
    pid = httpx.get(node.api + "/mesh/status").json()["nodes"][0]["models"][0]["pid"]
    client = openai.OpenAI(base_url=node.v1, api_key="x", max_retries=0, timeout=30)
    got_first = threading.Event()
    ended = threading.Event()
    outcome = {}

    def reader():
        try:
            for chunk in client.chat.completions.create(
                    model=CHAT, messages=[{"role": "user", "content": "Tell a very long story."}],
                    max_tokens=1900, temperature=0, logit_bias=NO_EOS, stream=True):
                got_first.set()
            outcome["end"] = "the stream ended as if complete"
        except (openai.APIError, httpx.HTTPError) as exc:   # anything else fails the thread
            outcome["end"] = exc
        finally:
            ended.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    assert got_first.wait(60)
    code = node.stop(sig, timeout=5)    # fails (and kills it) if it is still up after 5 s
    assert code == 0, node.log_tail()
    assert ended.wait(5), "the client's stream never ended"
    # it ended with an error event the client reads (the official client raises APIError
    # on it), not with a cut connection or as if the story were complete
    assert "end" in outcome, "the stream broke with another exception (its traceback is above)"
    end = outcome["end"]
    assert isinstance(end, openai.APIError) and not isinstance(end, openai.APIConnectionError), end
    assert end.message
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert "Traceback" not in node.log_tail(100000)
