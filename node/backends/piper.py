"""Piper text-to-speech backend (runs inside a worker process).

One model is one Piper voice: a VITS network in ONNX (run by onnxruntime) and its
`.onnx.json` (sample rate, phoneme map, speakers, default scales). Piper's espeak-ng
phonemizer splits the input into sentences; each sentence is synthesized, encoded and
sent as an ``Audio`` event as soon as it exists, so the first sound reaches the client
(a peer, then the HTTP client) while later sentences are still being read. The first
event waits for the first sentence: every check (voice, format, nothing to read) fails
before any byte is sent. A cancelled request stops at the next sentence.

Voices. The voice's own names (its file name, e.g. `en_US-joe-medium`, and its dataset,
`joe`), the speakers of a multi-speaker voice (`speaker_id_map`), and OpenAI's built-in
names (`alloy`, `ash`, ... `OPENAI_VOICES`), which read with the voice's default speaker;
case does not matter. Any other name is a 400 naming `voice` and listing the names.

Speed: length_scale = the voice's length_scale / speed. It scales phoneme durations, and
each phoneme lasts at least one 256-sample frame, so speed 2.0 makes speech about 0.6x as
long, not 0.5x (measured on en_US-joe-medium: docs/speech.md).

Formats: wav (16-bit mono at the voice's rate; streamed, so the RIFF and data sizes are
0xFFFFFFFF, "until the end", as OpenAI streams WAV), pcm (the same samples, no header),
and mp3, opus (Ogg), aac (ADTS), flac encoded by PyAV (ffmpeg's encoders and muxers,
shipped with faster-whisper) into a buffer drained after each sentence. A format whose
encoder this node lacks is a 400 naming `response_format`.
"""

from __future__ import annotations

import io
import json
import os
import struct
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnxruntime
from piper import PiperVoice
from piper.config import PiperConfig, SynthesisConfig

from mesh.wire.inference import Audio, Done, Event, Speak, Usage
from node.backends import RequestError

OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage",
                 "shimmer", "verse", "marin", "cedar")
# format -> (PyAV container, encoder, sample rate it needs or None for the voice's own)
_AV_FORMATS = {"mp3": ("mp3", "libmp3lame", None), "opus": ("ogg", "libopus", 48000),
               "aac": ("adts", "aac", None), "flac": ("flac", "flac", None)}
_OGG_PAGE_US = "100000"      # Ogg pages of 0.1 s (default 1 s): opus streams per sentence too
_MP3_BIT_RATE = 64000        # mono speech; libmp3lame's default here is 32 kb/s


def _av_encoders() -> set[str]:
    """The PyAV formats whose encoder is really present in this process."""
    try:
        import av
    except ImportError:
        return set()
    found = set()
    for fmt, (_, codec, _) in _AV_FORMATS.items():
        try:
            av.codec.Codec(codec, "w")
        except Exception:   # av.codec.codec.UnknownCodecError: not in this ffmpeg build
            continue
        found.add(fmt)
    return found


class _Buffer(io.RawIOBase):
    """A write-only, unseekable file for PyAV: what the muxer wrote since the last take."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.data += b
        return len(b)

    def take(self) -> bytes:
        out = bytes(self.data)
        self.data.clear()
        return out


class _Encoder:
    """One request's audio in its format: feed int16 samples, get bytes to send."""

    def __init__(self, fmt: str, rate: int) -> None:
        self.fmt, self.rate = fmt, rate
        self.head = b""
        if fmt == "wav":
            self.head = (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVEfmt " +
                         struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) +
                         b"data" + struct.pack("<I", 0xFFFFFFFF))
        elif fmt in _AV_FORMATS:
            import av
            container, codec, codec_rate = _AV_FORMATS[fmt]
            self.out = _Buffer()
            self.mux = av.open(self.out, "w", format=container,
                               options={"page_duration": _OGG_PAGE_US} if container == "ogg" else {})
            self.stream = self.mux.add_stream(codec, rate=codec_rate or rate, layout="mono")
            if fmt == "mp3":
                self.stream.codec_context.bit_rate = _MP3_BIT_RATE

    def encode(self, samples: np.ndarray) -> bytes:
        if self.fmt in ("wav", "pcm"):
            head, self.head = self.head, b""
            return head + samples.astype("<i2").tobytes()
        import av
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.rate
        for packet in self.stream.encode(frame):
            self.mux.mux(packet)
        return self.out.take()

    def finish(self) -> bytes:
        if self.fmt in ("wav", "pcm"):
            return b""
        for packet in self.stream.encode(None):
            self.mux.mux(packet)
        self.mux.close()
        return self.out.take()


class PiperBackend:
    name = "piper"

    def __init__(self, model_path: str, config: dict[str, Any]) -> None:
        self.config = config
        path = Path(model_path)
        with open(f"{path}.json", encoding="utf-8") as f:
            raw = json.load(f)
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = int(config.get("threads") or len(os.sched_getaffinity(0)))
        opts.inter_op_num_threads = 1
        self.voice = PiperVoice(config=PiperConfig.from_dict(raw), session=onnxruntime.InferenceSession(
            str(path), sess_options=opts, providers=["CPUExecutionProvider"]))
        self.rate = self.voice.config.sample_rate
        own = {path.stem: None, **({raw["dataset"]: None} if raw.get("dataset") else {})}
        self.voices: dict[str, int | None] = {
            **{v: None for v in OPENAI_VOICES}, **own,
            **{str(k): int(i) for k, i in self.voice.config.speaker_id_map.items()}}
        self.own_names = [*own, *map(str, self.voice.config.speaker_id_map)]
        self.formats = ["wav", "pcm", *sorted(_av_encoders())]
        self._lock = threading.Lock()
        self.busy = 0
        self.realtime_factor = 0.0

    def info(self) -> dict[str, Any]:
        return {"backend": self.name, "slots": 1, "sample_rate": self.rate,
                "voices": self.own_names, "formats": self.formats}

    def stats(self) -> dict[str, Any]:
        return {"busy": self.busy, "realtime_factor": round(self.realtime_factor, 2)}

    def _speaker(self, name: str) -> int | None:
        by_fold = {k.casefold(): v for k, v in self.voices.items()}
        if name.casefold() not in by_fold:
            raise RequestError(
                f"voice {name!r} is not a voice of this model; its voices: "
                f"{', '.join(self.own_names)} (OpenAI's {', '.join(OPENAI_VOICES)} read with "
                "the default one)", param="voice", code="invalid_value")
        return by_fold[name.casefold()]

    def speak(self, req: Speak, cancel: threading.Event) -> Iterator[Event]:
        """The request's events: Audio per sentence, then Done (module note)."""
        speaker = self._speaker(req.voice)
        if "\x00" in req.input:     # espeak-ng takes C strings
            raise RequestError("input contains a NUL character", param="input",
                               code="invalid_value")
        if req.format not in self.formats:
            raise RequestError(
                f"response_format {req.format!r} is not available on this node (it has no "
                f"encoder for it); use one of {', '.join(self.formats)}",
                param="response_format", code="unsupported_value")
        syn = SynthesisConfig(speaker_id=speaker,
                              length_scale=self.voice.config.length_scale / req.speed)
        with self._lock:
            self.busy += 1
        t0, samples, phonemes = time.perf_counter(), 0, 0
        try:
            chunks = iter(self.voice.synthesize(req.input, syn_config=syn))
            chunk = next(chunks, None)
            if chunk is None:
                raise RequestError("input has nothing to read aloud (no words after "
                                   "phonemization)", param="input", code="invalid_value")
            encoder = _Encoder(req.format, self.rate)
            while chunk is not None:
                samples += len(chunk.audio_int16_array)
                phonemes += len(chunk.phoneme_ids)
                data = encoder.encode(chunk.audio_int16_array)
                if data:
                    yield Audio(data=data)
                if cancel.is_set():
                    yield Done(finish_reason="cancelled")
                    return
                chunk = next(chunks, None)
            tail = encoder.finish()
            if tail:
                yield Audio(data=tail)
        finally:
            with self._lock:
                self.busy -= 1
            if samples:
                self.realtime_factor = samples / self.rate / max(time.perf_counter() - t0, 1e-6)
        yield Done(finish_reason="stop", usage=Usage(
            prompt_tokens=phonemes, completion_tokens=samples, total_tokens=phonemes + samples))
