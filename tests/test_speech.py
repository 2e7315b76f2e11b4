"""Text to speech, /v1/audio/speech, with the official openai client: a two-node mesh where
node a serves the Piper voice en_US-joe-medium (gallery: piper-en-us-joe-medium, alias
tts-1), whisper tiny.en and SmolLM2, and node b serves nothing and proxies to a."""

from __future__ import annotations

import base64
import io
import json
import re
import time
import wave
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests.procs import MeshNode, models_dir, run_cli

VOICE = "piper-en-us-joe-medium"
CHAT = "smollm2-135m-instruct"
FOX = "The quick brown fox jumps over the lazy dog."
SPEC = Path(__file__).resolve().parents[2] / "shared" / "data" / "openai-openapi.json"


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def wav_frames(data: bytes) -> tuple[wave.Wave_read, int]:
    """The WAV and its real frame count (a streamed WAV's header says 0xFFFFFFFF bytes)."""
    w = wave.open(io.BytesIO(data))
    return w, len(w.readframes(w.getnframes())) // (w.getsampwidth() * w.getnchannels())


def voice_rate() -> int:
    """The sample rate the installed voice's own config declares."""
    cfg = models_dir() / VOICE / "en_US-joe-medium.onnx.json"
    return json.loads(cfg.read_text())["audio"]["sample_rate"]


def eventually(fn, timeout=20.0, interval=0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("speech")
    token = run_cli("token").stdout.strip()
    a = MeshNode(tmp / "a", ["--name", "a", "--token", token, "--no-mdns", "--model", VOICE,
                             "--model", "whisper-tiny.en", "--model", CHAT]).start()
    b = None
    try:
        addr = a.wait_for(r"mesh: p2p (/ip4/127\.0\.0\.1/\S+)").group(1)
        a.wait_ready()
        b = MeshNode(tmp / "b", ["--name", "b", "--no-models", "--token", token, "--no-mdns",
                                 "--peer", addr]).start().wait_ready()
        yield a, b
    finally:
        for n in (b, a):
            if n is not None:
                n.stop()


@pytest.fixture(scope="module")
def client(mesh):
    return openai.OpenAI(base_url=mesh[0].v1, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def validate():
    if not SPEC.exists():
        pytest.skip(f"{SPEC} is not there (../shared beside the checkout)")
    registry = Registry().with_resource("urn:openai", Resource.from_contents(
        json.loads(SPEC.read_text()), default_specification=DRAFT202012))

    def check(obj, name: str) -> None:
        jsonschema.Draft202012Validator({"$ref": f"urn:openai#/components/schemas/{name}"},
                                        registry=registry).validate(obj)
    return check


def test_wav_is_valid_and_reads_back_as_the_input(client) -> None:
    r = client.audio.speech.create(model="tts-1", voice="alloy", input=FOX,
                                   response_format="wav")
    assert r.response.headers["content-type"] == "audio/wav"
    w, frames = wav_frames(r.content)
    assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (voice_rate(), 1, 2)
    assert frames / w.getframerate() > 1.0
    heard = client.audio.transcriptions.create(model="whisper-1", file=("fox.wav", r.content))
    assert words(heard.text) == words(FOX)


def test_voices_map_to_the_installed_voice(client) -> None:
    for voice in ("joe", "en_US-joe-medium", "NOVA"):
        r = client.audio.speech.create(model=VOICE, voice=voice, input="Good morning.",
                                       response_format="wav")
        assert wav_frames(r.content)[1] > 0
    with pytest.raises(openai.BadRequestError) as ei:
        client.audio.speech.create(model=VOICE, voice="hal9000", input="Hello.")
    assert ei.value.body["param"] == "voice" and "hal9000" in ei.value.body["message"]
    assert "joe" in ei.value.body["message"]


def test_speed_changes_the_length(client) -> None:
    def seconds(speed: float) -> float:
        r = client.audio.speech.create(model="tts-1", voice="alloy", input=FOX, speed=speed,
                                       response_format="wav")
        w, frames = wav_frames(r.content)
        return frames / w.getframerate()
    normal, fast, slow = seconds(1.0), seconds(2.0), seconds(0.5)
    assert fast < 0.8 * normal and slow > 1.3 * normal, (fast, normal, slow)


def test_pcm_is_raw_16_bit_samples_at_the_voice_rate(client) -> None:
    wav, frames = wav_frames(client.audio.speech.create(
        model="tts-1", voice="alloy", input=FOX, response_format="wav").content)
    r = client.audio.speech.create(model="tts-1", voice="alloy", input=FOX,
                                   response_format="pcm")
    pcm = r.content
    assert r.response.headers["content-type"] == "audio/pcm"
    assert pcm[:4] != b"RIFF" and len(pcm) % 2 == 0
    assert abs(len(pcm) / 2 - frames) < 0.15 * frames      # same speech, same rate
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:       # what a client does with pcm: it knows the rate
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(voice_rate())
        out.writeframes(pcm)
    heard = client.audio.transcriptions.create(model="whisper-1", file=("pcm.wav", buf.getvalue()))
    assert words(heard.text) == words(FOX)


def test_the_body_streams_while_the_voice_reads(client) -> None:
    text = " ".join(f"This is sentence number {n}, read aloud on its own." for n in
                    ("one", "two", "three", "four", "five", "six", "seven", "eight"))
    t0, arrivals = time.monotonic(), []
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=text, response_format="pcm") as r:
        assert r.headers["x-mesh-node"] == "a"
        for chunk in r.iter_bytes():
            arrivals.append((time.monotonic() - t0, len(chunk)))
    total = sum(n for _, n in arrivals)
    assert total / 2 / voice_rate() > 10          # eight sentences of speech
    assert len(arrivals) >= 4
    assert arrivals[0][0] < 0.5 * arrivals[-1][0], "the audio came all at once, not as a stream"


def test_a_client_that_hangs_up_frees_the_voice(client) -> None:
    """The voice reads one request at a time: a long one left after its first piece must
    stop at once (cancelled in the worker), not keep the next request waiting."""
    long_text = " ".join(f"Sentence {i} of a very long reading that nobody listens to."
                         for i in range(60))
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=long_text, response_format="pcm") as r:
        assert next(r.iter_bytes())
    t0 = time.monotonic()
    short = client.audio.speech.create(model="tts-1", voice="alloy", input="Next, please.",
                                       response_format="pcm")
    assert len(short.content) > 0 and time.monotonic() - t0 < 5.0


def test_compressed_formats_decode_to_the_same_speech(client) -> None:
    av = pytest.importorskip("av")          # ships with faster-whisper
    r = client.audio.speech.create(model="tts-1", voice="alloy", input=FOX)   # mp3 by default
    assert r.response.headers["content-type"] == "audio/mpeg"
    for fmt, container, data in [("mp3", "mp3", r.content)] + [
            (f, c, client.audio.speech.create(model="tts-1", voice="alloy", input=FOX,
                                              response_format=f).content)
            for f, c in (("opus", "ogg"), ("aac", "aac"), ("flac", "flac"))]:
        with av.open(io.BytesIO(data)) as f:
            assert f.format.name == container, fmt
            stream = f.streams.audio[0]
            samples = sum(frame.samples for frame in f.decode(stream))
            assert samples / stream.codec_context.sample_rate > 1.0, fmt
        heard = client.audio.transcriptions.create(model="whisper-1", file=(f"fox.{fmt}", data))
        assert words(heard.text) == words(FOX), fmt


def test_sse_stream_format(mesh, validate) -> None:
    events = []
    with httpx.stream("POST", mesh[0].v1 + "/audio/speech", timeout=60, json={
            "model": "tts-1", "voice": "alloy", "input": "Hello there. How are you today?",
            "response_format": "pcm", "stream_format": "sse"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    *deltas, done = events
    assert len(deltas) >= 2 and done["type"] == "speech.audio.done"
    for ev in deltas:
        validate(ev, "SpeechAudioDeltaEvent")
    validate(done, "SpeechAudioDoneEvent")
    pcm = b"".join(base64.b64decode(ev["audio"]) for ev in deltas)
    assert done["usage"]["output_tokens"] == len(pcm) // 2 > voice_rate()
    assert done["usage"]["total_tokens"] == sum(done["usage"][k] for k in ("input_tokens",
                                                                           "output_tokens"))


def test_bad_requests_are_openai_errors(client, validate) -> None:
    cases = [({"model": "no-such-voice"}, openai.NotFoundError, "model"),
             ({"model": CHAT}, openai.BadRequestError, "model"),
             ({"instructions": "Speak like a pirate."}, openai.BadRequestError, "instructions"),
             ({"speed": 5.0}, openai.BadRequestError, "speed"),
             ({"input": "   "}, openai.BadRequestError, "input"),
             ({"input": "x" * 4097}, openai.BadRequestError, "input"),
             ({"voice": {"id": "nobody"}}, openai.BadRequestError, "voice"),
             ({"extra_body": {"response_format": "ogg"}}, openai.BadRequestError,
              "response_format"),
             ({"extra_body": {"volume": 2}}, openai.BadRequestError, "volume")]
    for change, error, param in cases:
        kw = {"model": "tts-1", "voice": "alloy", "input": FOX, **change}
        with pytest.raises(error) as ei:
            client.audio.speech.create(**kw)
        validate({"error": ei.value.body}, "ErrorResponse")
        assert ei.value.body["param"] == param, (change, ei.value.body)


def test_models_list_shows_capabilities(client, validate) -> None:
    listing = client.models.with_raw_response.list()
    body = json.loads(listing.text)
    validate(body, "ListModelsResponse")
    caps = {m["id"]: m["capabilities"] for m in body["data"]}
    assert caps[VOICE] == ["speech"] and caps["whisper-tiny.en"] == ["transcription"]
    assert caps[CHAT] == ["chat", "completions", "embeddings"]   # its template has no tools
    assert client.models.retrieve(VOICE).model_extra["capabilities"] == ["speech"]


def test_a_node_without_the_voice_proxies_speech(mesh) -> None:
    a, b = mesh
    via_b = openai.OpenAI(base_url=b.v1, api_key="unused", max_retries=0, timeout=120)
    cards = eventually(lambda: {m.id: m.model_extra["capabilities"]
                                for m in via_b.models.list().data if m.id == VOICE})
    assert cards == {VOICE: ["speech"]}
    r = via_b.audio.speech.with_raw_response.create(model="tts-1", voice="alloy", input=FOX,
                                                    response_format="wav")
    assert r.headers["x-mesh-node"] == "a"
    w, frames = wav_frames(r.content)
    assert w.getframerate() == voice_rate() and frames / w.getframerate() > 1.0
    heard = openai.OpenAI(base_url=a.v1, api_key="unused", max_retries=0).audio.transcriptions \
        .create(model="whisper-1", file=("fox.wav", r.content))
    assert words(heard.text) == words(FOX)
    with pytest.raises(openai.BadRequestError) as ei:        # the peer's 400 comes back
        via_b.audio.speech.create(model="tts-1", voice="hal9000", input=FOX)
    assert ei.value.body["param"] == "voice"
