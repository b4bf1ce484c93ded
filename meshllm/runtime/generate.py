"""Generation in one process: a model run as one or more consecutive segments.

:class:`LocalModel` is what ``meshllm generate`` runs, and the reference that
the mesh must equal token for token: the same segments, the same sampler, the
same stop rules (EOS ids, llama2.c's stop on BOS, stop strings, max tokens,
the context length).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Hashable, Iterator, Sequence

import numpy as np

from meshllm.errors import GenerationError
from meshllm.model.manifest import Manifest, load_manifest, verify_files
from meshllm.model.tokenizer import StreamDecoder, Tokenizer, load_tokenizer
from meshllm.runtime.sampling import Sampler, SamplingParams
from meshllm.runtime.segment import Segment


@dataclass
class Completion:
    """The outcome of one generation, filled in as it streams."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS / stop string) or "length"
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        n = len(self.token_ids) - 1  # the first token comes from prefill
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "usage": {"prompt_tokens": len(self.prompt_ids), "completion_tokens": len(self.token_ids)},
            "timings": {
                "prompt_tokens": len(self.prompt_ids),
                "prefill_seconds": self.prefill_seconds,
                "prefill_tokens_per_second": len(self.prompt_ids) / self.prefill_seconds if self.prefill_seconds else 0.0,
                "decode_seconds": self.decode_seconds,
                "decode_tokens_per_second": self.decode_tokens_per_second,
            },
        }


class StopStrings:
    """Finds stop strings in streamed text, holding back what could start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.text = ""
        self.emitted = 0

    def push(self, delta: str) -> tuple[str, bool]:
        """Adds text; returns (text safe to emit now, whether a stop string was hit)."""
        self.text += delta
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.text = self.text[self.emitted:cut], self.text[:cut]
            self.emitted = cut
            return out, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        end = len(self.text) - hold
        out = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out, False

    def flush(self) -> str:
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out


class LocalModel:
    """A whole model in this process, cut into segments before the layers in ``split``."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        split: Sequence[int] = (),
        max_batch: int = 1,
        max_seq_len: int | None = None,
        threads: int | None = None,
        verify: bool = True,
        kv_dtype: str | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.manifest: Manifest = load_manifest(self.model_dir)
        n = self.manifest.config.n_layers
        cuts = sorted(set(split))
        if any(not 0 < c < n for c in cuts):
            raise GenerationError(f"split points must be layer indices strictly between 0 and {n}, got {list(split)}")
        bounds = [0, *cuts, n]
        if verify:
            verify_files(self.model_dir, self.manifest)
        self.segments = [
            Segment(self.model_dir, a, b, max_batch=max_batch, max_seq_len=max_seq_len, threads=threads,
                    verify=False, manifest=self.manifest, kv_dtype=kv_dtype)
            for a, b in zip(bounds[:-1], bounds[1:])
        ]
        self.tokenizer: Tokenizer = load_tokenizer(self.model_dir, self.manifest.tokenizer)
        self.config = self.manifest.config
        self.max_seq_len = self.segments[0].max_seq_len
        self._next_seq = 0

    # --- forward passes through all segments -------------------------

    def prefill(self, seq: Hashable, ids: Sequence[int]) -> np.ndarray:
        x: np.ndarray = np.asarray(ids, np.int64)
        for s in self.segments:
            x = s.prefill(seq, x)
        return x[0]

    def decode(self, seqs: Sequence[Hashable], ids: Sequence[int]) -> np.ndarray:
        x: np.ndarray = np.asarray(ids, np.int64)
        for s in self.segments:
            x = s.decode(seqs, x)
        return x

    def open(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        for s in self.segments:
            s.open(seq)
        return seq

    def close(self, seq: Hashable) -> None:
        for s in self.segments:
            s.close(seq)

    # --- generation ---------------------------------------------------

    def encode_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, bos=True)

    def stream(self, prompt: str | Sequence[int], params: SamplingParams) -> Iterator[tuple[str, Completion]]:
        """Yields (new text, completion so far) per token; the completion is final at the end."""
        ids = self.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise GenerationError("the prompt encodes to no tokens")
        if len(ids) >= self.max_seq_len:
            raise GenerationError(
                f"prompt of {len(ids)} tokens does not fit the context of {self.max_seq_len} tokens")
        done = Completion(prompt_ids=ids)
        sampler = Sampler(params)
        stop_ids = self.config.stop_ids()
        detok = StreamDecoder(self.tokenizer, prev=ids[-1])
        stops = StopStrings(params.stop)
        seq = self.open()
        try:
            t0 = time.perf_counter()
            logits = self.prefill(seq, ids)
            done.prefill_seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
            hit = False
            while True:
                token = sampler(logits)
                if token in stop_ids:
                    done.finish_reason = "stop"
                    break
                done.token_ids.append(token)
                text, hit = stops.push(detok.push(token))
                done.text += text
                if text:
                    yield text, done
                if hit:
                    done.finish_reason = "stop"
                    break
                if len(done.token_ids) >= params.max_tokens or len(ids) + len(done.token_ids) >= self.max_seq_len:
                    done.finish_reason = "length"
                    break
                logits = self.decode([seq], [token])[0]
            done.decode_seconds = time.perf_counter() - t1
            if not hit:  # release what the detokenizer and the stop matcher held back
                text, hit = stops.push(detok.flush())
                text += "" if hit else stops.flush()
                done.finish_reason = "stop" if hit else done.finish_reason
                done.text += text
                if text:
                    yield text, done
        finally:
            self.close(seq)
        yield "", done

    def generate(self, prompt: str | Sequence[int], params: SamplingParams) -> Completion:
        result = None
        for _, result in self.stream(prompt, params):
            pass
        assert result is not None
        return result
