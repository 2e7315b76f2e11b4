"""faster-whisper backend (runs inside a worker process).

The audio arrives as the uploaded file's bytes; PyAV (bundled with faster-whisper)
decodes any container ffmpeg knows. Undecodable input is a 400, not a crash.
Segments come back as plain data; api/ renders json/text/verbose_json/srt/vtt.
"""

from __future__ import annotations

import io
import os
import threading
import time
from typing import Any

from faster_whisper import WhisperModel

from mesh.wire.inference import Transcribe
from node.backends import RequestError


class WhisperBackend:
    name = "whisper"

    def __init__(self, model_path: str, config: dict[str, Any]) -> None:
        self.config = config
        threads = int(config.get("threads") or len(os.sched_getaffinity(0)))
        self.model = WhisperModel(model_path, device="cpu", compute_type="int8",
                                  cpu_threads=threads)
        self._lock = threading.Lock()
        self.busy = 0
        self.realtime_factor = 0.0

    def info(self) -> dict[str, Any]:
        return {"backend": self.name, "slots": 1,
                "multilingual": bool(self.model.model.is_multilingual)}

    def stats(self) -> dict[str, Any]:
        return {"busy": self.busy, "realtime_factor": round(self.realtime_factor, 2)}

    def transcribe(self, req: Transcribe) -> dict[str, Any]:
        language = req.language or None
        if language and not self.model.model.is_multilingual and language != "en":
            raise RequestError(f"this model only transcribes English, not {language!r}",
                               param="language", code="unsupported_language")
        with self._lock:
            self.busy += 1
            t0 = time.perf_counter()
            try:
                try:
                    segments, info = self.model.transcribe(
                        io.BytesIO(req.audio), language=language,
                        temperature=float(req.temperature),
                        initial_prompt=req.prompt or None,
                        word_timestamps=False, vad_filter=False)
                    segs = [{"id": s.id, "seek": s.seek, "start": round(s.start, 3),
                             "end": round(s.end, 3), "text": s.text, "tokens": list(s.tokens),
                             "temperature": s.temperature, "avg_logprob": s.avg_logprob,
                             "compression_ratio": s.compression_ratio,
                             "no_speech_prob": s.no_speech_prob} for s in segments]
                except RequestError:
                    raise
                except Exception as exc:  # av.error.*, ValueError from decode: bad audio
                    if type(exc).__module__.startswith("av") or isinstance(exc, (ValueError, IndexError)):
                        raise RequestError(f"could not decode the audio file: {exc}",
                                           param="file", code="unsupported_audio") from exc
                    raise
            finally:
                self.busy -= 1
            if info.duration:
                self.realtime_factor = info.duration / max(time.perf_counter() - t0, 1e-6)
        return {"language": info.language, "duration": info.duration,
                "text": "".join(s["text"] for s in segs).strip(), "segments": segs}
