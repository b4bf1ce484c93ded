"""When a generation stops, and what text it emits on the way: the one stop rule.

``meshllm generate`` (:class:`~meshllm.runtime.generate.LocalModel`) and the
mesh's last stage (:class:`~meshllm.serve.sequence.SequenceState`) both feed
each sampled token to a :class:`StopRule`, so that the mesh's text equals a
single process's, token for token and byte for byte. Pure: no clocks, no I/O.

The rule, in order, for each sampled token:

1. an end-of-sequence id (the model's EOS ids, and llama2.c's BOS) stops with
   ``"stop"``; the token is not part of the output;
2. otherwise the token is kept and its text detokenized; a stop string in the
   text so far stops with ``"stop"``, the stop string and what follows it cut;
3. ``max_tokens`` kept tokens, or a full context (prompt + kept tokens), stop
   with ``"length"``.

At the end (:meth:`StopRule.finish`) the text that the detokenizer and the stop
matcher held back is released, unless a stop string already ended the text;
if that tail completes a stop string the reason becomes ``"stop"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from meshllm.model.tokenizer import StreamDecoder, Tokenizer


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


@dataclass(frozen=True)
class Step:
    """What one sampled token did: whether it is kept, the text it releases, and whether generation ends."""

    kept: bool  # False for an end-of-sequence id, which is not part of the output
    text: str  # text to emit now (may be empty: held back, or part of a multi-byte character)
    finish: str | None  # "stop" or "length" to end here; None to go on


class StopRule:
    """One generation's stop rule and detokenizer (see the module docstring for the rule)."""

    def __init__(self, tokenizer: Tokenizer, stop_ids: frozenset[int], stop: Sequence[str], max_tokens: int,
                 prompt_len: int, last_prompt_token: int | None) -> None:
        self.stop_ids, self.max_tokens, self.prompt_len = stop_ids, max_tokens, prompt_len
        self.detok = StreamDecoder(tokenizer, prev=last_prompt_token)
        self.stops = StopStrings(stop)
        self.kept = 0  # tokens kept so far
        self._hit = False  # a stop string ended the text: nothing is held back any more

    def push(self, token: int, context: int) -> Step:
        """Applies the rule to one sampled token; ``context`` is the sequence's context length."""
        if token in self.stop_ids:
            return Step(False, "", "stop")
        self.kept += 1
        text, self._hit = self.stops.push(self.detok.push(token))
        if self._hit:
            return Step(True, text, "stop")
        if self.kept >= self.max_tokens or self.prompt_len + self.kept >= context:
            return Step(True, text, "length")
        return Step(True, text, None)

    def finish(self, reason: str) -> tuple[str, str]:
        """(The text held back, the final reason) when generation ends for ``reason``."""
        if self._hit:
            return "", "stop"
        text, hit = self.stops.push(self.detok.flush())
        return (text, "stop") if hit else (text + self.stops.flush(), reason)
