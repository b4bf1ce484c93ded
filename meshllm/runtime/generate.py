"""Generation in one process: a model run as one or more consecutive segments.

:class:`LocalModel` is what ``meshllm generate`` runs, and the reference that
the mesh must equal token for token: the same segments, the same sampler (and
its defaults, :class:`~meshllm.runtime.sampling.SamplingParams`), the same
stop rule (:class:`~meshllm.runtime.stopping.StopRule`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from meshllm.errors import GenerationError
from meshllm.model.manifest import Manifest, load_manifest, verify_files
from meshllm.model.tokenizer import Tokenizer, load_tokenizer
from meshllm.runtime.sampling import Sampler, SamplingParams
from meshllm.runtime.segment import Segment
from meshllm.runtime.stopping import StopRule


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
                "prefill_tokens_per_second": (len(self.prompt_ids) / self.prefill_seconds
                                              if self.prefill_seconds else 0.0),
                "decode_seconds": self.decode_seconds,
                "decode_tokens_per_second": self.decode_tokens_per_second,
            },
        }


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
            for a, b in itertools.pairwise(bounds)
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
        rule = StopRule(self.tokenizer, self.config.stop_ids(), params.stop, params.max_tokens, len(ids), ids[-1])
        seq = self.open()
        try:
            t0 = time.perf_counter()
            logits = self.prefill(seq, ids)
            done.prefill_seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
            while True:
                token = sampler(logits)
                step = rule.push(token, self.max_seq_len)
                if step.kept:
                    done.token_ids.append(token)
                done.text += step.text
                if step.text:
                    yield step.text, done
                if step.finish is not None:
                    break
                logits = self.decode([seq], [token])[0]
            done.decode_seconds = time.perf_counter() - t1
            text, done.finish_reason = rule.finish(step.finish)  # what the stop rule held back
            done.text += text
            if text:
                yield text, done
        finally:
            self.close(seq)
        yield "", done

    def generate(self, prompt: str | Sequence[int], params: SamplingParams) -> Completion:
        result = None
        for _, result in self.stream(prompt, params):  # noqa: B007 (the last one is the completion)
            pass
        assert result is not None
        return result
