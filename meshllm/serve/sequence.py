"""One request's output side: sampling state, detokenizer, stop rules and its reply stream.

Lives on the last stage of the DECODE (or MIXED) replica serving the request,
the single writer of its reply topic, so tokens are published exactly once
and in order. The stop rule is the one ``meshllm generate`` applies
(:class:`~meshllm.runtime.stopping.StopRule`), so the mesh's text equals a
single process's token for token.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from meshllm.model.tokenizer import Tokenizer
from meshllm.runtime.sampling import Sampler
from meshllm.runtime.stopping import StopRule
from meshllm.serve import api
from meshllm.serve.journal import PROGRESS_EVERY_S
from meshllm.serve.protocol import RequestMeta

Publish = Callable[[str, dict[str, Any]], Awaitable[None]]
Checkpoint = Callable[["SequenceState"], Awaitable[None]]


@dataclass
class SequenceState:
    id: str
    meta: RequestMeta
    sampler: Sampler
    tokenizer: Tokenizer
    stop_ids: frozenset[int]
    publish: Publish
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    finish_reason: str | None = None
    checkpoint: Checkpoint | None = None  # records progress in the journal, so that the request can resume
    sent: list[dict[str, Any]] = field(default_factory=list)  # every reply by index, for a client's replay
    _checkpointed: float = 0.0

    def __post_init__(self) -> None:
        self.params = self.meta.sampling
        self.prompt_len = self.meta.prompt_len
        self.rule = StopRule(self.tokenizer, self.stop_ids, self.params.stop, self.params.max_tokens,
                             self.prompt_len, self.meta.last_prompt_token)
        # A resumed request: replay what was streamed before, without publishing, so that the
        # detokenizer and the stop rule are where they were and indices continue.
        for token in self.meta.resume.tokens if self.meta.resume is not None else ():
            self.tokens.append(int(token))
            text = self.rule.push(int(token), context=1 << 62).text  # it went on then: no end to find
            self.sent.append(api.token_reply(self.request_id, len(self.tokens) - 1, text, int(token)))

    @property
    def request_id(self) -> str:
        """The app's id (``id`` is the key frames use, which differs once the request resumed)."""
        return self.meta.request_id or self.id

    @property
    def reply_to(self) -> str:
        return self.meta.reply_to

    async def _send(self, reply: dict[str, Any]) -> None:
        self.sent.append(reply)
        await self.publish(self.reply_to, reply)

    async def replay(self, start: int) -> int:
        """Publishes again the replies from index ``start`` on (a client that lost its broker asks for them;
        it drops an index it has); returns how many."""
        for reply in self.sent[start:]:
            await self.publish(self.reply_to, reply)
        return max(0, len(self.sent) - start)

    async def push(self, token: int, context: int) -> bool:
        """Handles a sampled token; returns whether the request goes on."""
        step = self.rule.push(token, context)
        if not step.kept:
            return await self._finish("stop")
        self.tokens.append(token)
        await self._send(api.token_reply(self.request_id, len(self.tokens) - 1, step.text, token))
        now = time.monotonic()
        if self.checkpoint is not None and now - self._checkpointed >= PROGRESS_EVERY_S:
            self._checkpointed = now
            await self.checkpoint(self)
        if step.finish == "stop":
            return await self._finish("stop")
        if self.cancelled:
            return await self._finish("cancelled")
        if step.finish is not None:
            return await self._finish(step.finish)
        return True

    async def _finish(self, reason: str) -> bool:
        text, reason = self.rule.finish(reason)
        self.finish_reason = reason
        now = time.time()
        m = self.meta
        first = now if m.first_token_at is None else m.first_token_at
        received = now if m.received_at is None else m.received_at
        started = now if m.prefill_started_at is None else m.prefill_started_at
        n = len(self.tokens)
        timings = {
            "queue_s": round(started - received, 6),
            "ttft_s": round(first - received, 6),
            "total_s": round(now - received, 6),
            "tokens_per_s": round((n - 1) / (now - first), 3) if n > 1 and now > first else 0.0,
            "replicas": {"prefill": m.prefill_replica, "decode": m.decode_replica},
            "resumed": m.attempt,
        }
        await self._send(api.final_reply(self.request_id, n, text, reason, self.prompt_len, n, timings))
        return False
