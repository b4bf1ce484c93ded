"""OpenAI's HTTP API in terms of the mesh's request API. Pure: no I/O.

Owns three translations and nothing else:

- **requests**: the JSON body of ``POST /v1/chat/completions`` or
  ``/v1/completions`` becomes a :class:`MeshCall` (the keyword arguments of
  :meth:`meshllm.serve.client.Client.stream` plus how to answer). Fields the
  mesh cannot honour (``n`` > 1, tools, logprobs, penalties) are refused with a
  400 that names them, never silently dropped; unknown fields are refused as
  OpenAI refuses them. Ranges the mesh itself checks are left to the client's
  validation, which uses the mesh's own rules and messages.
- **answers**: a whole completion as a response object, a stream as
  server-sent events in OpenAI's chunk format (:class:`SSEEncoder`, which
  pre-encodes all but the token text, since it runs once per token).
- **errors**: a mesh error code (``meshllm.serve.api``) or a client-side code
  (``meshllm.serve.client``) as an HTTP status and an OpenAI-style error object
  (:class:`APIError`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from meshllm.errors import APIError
from meshllm.serve import api
from meshllm.serve.client import OVERFLOW, PROTOCOL_ERROR, TIMEOUT

# --- errors -------------------------------------------------------------------

# mesh / client error code -> (HTTP status, OpenAI error type)
_STATUS: dict[str, tuple[int, str]] = {
    api.INVALID_JSON: (400, "invalid_request_error"),
    api.INVALID_REQUEST: (400, "invalid_request_error"),
    api.CONTEXT_LENGTH: (400, "invalid_request_error"),
    api.BUSY: (429, "rate_limit_error"),
    api.UNAVAILABLE: (503, "server_error"),
    api.INTERNAL: (500, "server_error"),
    api.CANCELLED: (499, "server_error"),  # cancelled on the mesh by someone else; nginx's 499
    TIMEOUT: (504, "server_error"),
    PROTOCOL_ERROR: (502, "server_error"),
    OVERFLOW: (502, "server_error"),
}
RETRY_AFTER_S = 2  # what 503 and 429 answers suggest (the Retry-After header, in seconds)


def mesh_error(code: str, message: str) -> APIError:
    """The mesh's (or the client's) error ``code`` as the HTTP answer that says the same."""
    status, type_ = _STATUS.get(code, (500, "server_error"))
    retry = RETRY_AFTER_S if status in (429, 503) else None
    return APIError(status, message, type_, code=code, retry_after=retry)


def unavailable(message: str) -> APIError:
    return APIError(503, message, "server_error", code=api.UNAVAILABLE, retry_after=RETRY_AFTER_S)


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param=param, code=code)


# --- requests -----------------------------------------------------------------


@dataclass(frozen=True)
class MeshCall:
    """One OpenAI request as the mesh request to make and how to answer it."""

    endpoint: str  # "chat" or "completions"
    model: str
    stream: bool
    include_usage: bool
    params: dict[str, Any]  # Client.stream keyword arguments: prompt or messages, and the sampling values


_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options", "n",
           "user", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                         "tool_choice", "parallel_tool_calls", "functions", "function_call", "store", "metadata",
                         "service_tier", "modalities"}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "best_of", "suffix"}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def parse_body(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON: {e}", code=api.INVALID_JSON) from None
    except RecursionError:
        raise bad("the request body is not valid JSON: nested too deeply", code=api.INVALID_JSON) from None
    if not isinstance(obj, dict):
        raise bad("the request body must be a JSON object", code=api.INVALID_JSON)
    return obj


def parse_chat(body: bytes) -> MeshCall:
    """``POST /v1/chat/completions``. Without ``max_tokens``, ``params["max_tokens"]`` is None: the
    caller lets the answer fill the context, as OpenAI does."""
    obj = parse_body(body)
    _refuse_unknown(obj, CHAT_FIELDS)
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty array of {role, content} objects", "messages")
    chat = [_message(m, i) for i, m in enumerate(messages)]
    _refuse_unsupported(obj, chat=True)
    max_tokens = _max_tokens(obj, "max_completion_tokens") if obj.get("max_completion_tokens") is not None \
        else _max_tokens(obj, "max_tokens")
    params: dict[str, Any] = {"messages": chat, **_sampling(obj), "max_tokens": max_tokens}
    return MeshCall("chat", _model(obj), *_stream(obj), params=params)


def with_chat_template(call: MeshCall, template: str) -> MeshCall:
    """A chat call whose messages are rendered here with ``template`` (the gateway's ``--chat-template``)
    and sent as a prompt. ``bos_token`` and ``eos_token`` render empty: the mesh encodes the text as any
    prompt, with the model's BOS where it uses one."""
    from meshllm.errors import TokenizerError
    from meshllm.model.tokenizer import render_chat_template

    if call.endpoint != "chat":
        return call
    params = dict(call.params)
    try:
        params["prompt"] = render_chat_template(template, params.pop("messages"))
    except TokenizerError as e:  # the template refused these messages (raise_exception), or failed on them
        raise bad(str(e), "messages") from None
    if not params["prompt"]:
        raise bad("the chat template made an empty prompt of these messages", "messages")
    return MeshCall(call.endpoint, call.model, call.stream, call.include_usage, params)


def parse_completion(body: bytes) -> MeshCall:
    """``POST /v1/completions`` (the legacy, plain-prompt API; ``max_tokens`` defaults to 16 as there)."""
    obj = parse_body(body)
    _refuse_unknown(obj, COMPLETION_FIELDS)
    prompt = obj.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        raise bad("this mesh takes one prompt per request; send several requests instead", "prompt")
    if not isinstance(prompt, str) or not prompt:
        raise bad("'prompt' must be a non-empty string (token-id prompts are not supported)", "prompt")
    _refuse_unsupported(obj, chat=False)
    if obj.get("echo"):
        raise bad("'echo' is not supported by this mesh", "echo")
    if obj.get("suffix"):
        raise bad("'suffix' (insertion) is not supported by this mesh", "suffix")
    if obj.get("best_of") not in (None, 1):
        raise bad("'best_of' must be 1 on this mesh", "best_of")
    max_tokens = _max_tokens(obj, "max_tokens")
    params: dict[str, Any] = {"prompt": prompt, **_sampling(obj),
                              "max_tokens": 16 if max_tokens is None else max_tokens}
    return MeshCall("completions", _model(obj), *_stream(obj), params=params)


def _refuse_unknown(obj: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(obj) - known)
    if unknown:
        raise bad(f"Unrecognized request argument supplied: {', '.join(unknown)}", unknown[0])


def _model(obj: dict[str, Any]) -> str:
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        raise bad("you must provide a model parameter (a string; GET /v1/models lists the mesh's model)", "model")
    return model


def _stream(obj: dict[str, Any]) -> tuple[bool, bool]:
    stream = obj.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad("'stream' must be a boolean", "stream")
    opts = obj.get("stream_options")
    if opts is not None:
        if not stream:
            raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(opts, dict) or set(opts) - {"include_usage", "include_obfuscation"} \
                or not isinstance(opts.get("include_usage", False), bool):
            raise bad("'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
    return bool(stream), bool(opts and opts.get("include_usage"))


def _message(m: Any, i: int) -> dict[str, str]:
    where = f"messages[{i}]"
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise bad(f"{where} must be an object with a string 'role'", where)
    role = _ROLES.get(m["role"])
    if role is None:
        raise bad(f"{where}: role {m['role']!r} is not supported (use system, developer, user or assistant; "
                  "this mesh has no tools)", f"{where}.role")
    if m.get("tool_calls") or m.get("function_call"):
        raise bad(f"{where}: tool calls are not supported by this mesh", f"{where}.tool_calls")
    content = m.get("content")
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise bad(f"{where}: only text content parts ({{\"type\": \"text\", \"text\": ...}}) are supported",
                          f"{where}.content")
            parts.append(p["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise bad(f"{where} needs a string 'content' (or an array of text parts)", f"{where}.content")
    return {"role": role, "content": content}


def _refuse_unsupported(obj: dict[str, Any], chat: bool) -> None:
    """Fields OpenAI knows that this mesh cannot honour: fine at their defaults, refused otherwise."""
    if obj.get("n") not in (None, 1):
        raise bad("'n' must be 1: this mesh makes one answer per request", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        v = obj.get(name)
        if v is not None and (not _is_number(v) or v != 0):
            raise bad(f"'{name}' is not supported by this mesh (leave it out or 0)", name)
    if obj.get("logit_bias"):
        raise bad("'logit_bias' is not supported by this mesh", "logit_bias")
    if obj.get("logprobs") or obj.get("top_logprobs"):
        raise bad("log probabilities are not supported by this mesh", "logprobs")
    if chat:
        if obj.get("tools") or obj.get("functions"):
            raise bad("tools are not supported by this mesh", "tools")
        if obj.get("tool_choice") not in (None, "none", "auto") or obj.get("function_call") not in (None, "none",
                                                                                                     "auto"):
            raise bad("'tool_choice' is not supported by this mesh", "tool_choice")
        fmt = obj.get("response_format")
        if fmt is not None and fmt != {"type": "text"}:
            raise bad("only {\"type\": \"text\"} responses are supported by this mesh", "response_format")
        if obj.get("modalities") not in (None, ["text"]):
            raise bad("only text output is supported by this mesh", "modalities")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _max_tokens(obj: dict[str, Any], name: str) -> int | None:
    v = obj.get(name)
    if v is None:
        return None
    if not _is_int(v) or v < 1:
        raise bad(f"'{name}' must be an integer of at least 1, got {v!r}", name)
    return int(v)


def _sampling(obj: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's defaults where the mesh's differ: temperature 1, top_p 1."""
    out: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0}
    for name in ("temperature", "top_p"):
        v = obj.get(name)
        if v is None:
            continue
        if not _is_number(v):
            raise bad(f"'{name}' must be a number, got {v!r}", name)
        out[name] = float(v)
    if out["temperature"] > 2 or out["temperature"] < 0:
        raise bad(f"'temperature' must be between 0 and 2, got {out['temperature']:g}", "temperature")
    for name in ("seed", "top_k"):
        v = obj.get(name)
        if v is None:
            continue
        if not _is_int(v):
            raise bad(f"'{name}' must be an integer, got {v!r}", name)
        out[name] = int(v)
    stop = obj.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise bad("'stop' must be a string or an array of strings", "stop")
        if stop:
            out["stop"] = stop
    return out


# --- answers ------------------------------------------------------------------


def usage_json(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response_json(call: MeshCall, rid: str, created: int, model: str, text: str, finish_reason: str,
                  usage: dict[str, int]) -> dict[str, Any]:
    """The whole (non-streamed) answer."""
    if call.endpoint == "chat":
        return {"id": f"chatcmpl-{rid}", "object": "chat.completion", "created": created, "model": model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                             "logprobs": None, "finish_reason": finish_reason}],
                "usage": usage}
    return {"id": f"cmpl-{rid}", "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage}


DONE_EVENT = b"data: [DONE]\n\n"


class SSEEncoder:
    """Server-sent events for one streamed answer, in OpenAI's chunk format.

    Everything but the text is encoded once per request, so a token costs one
    ``json.dumps`` of its text and a concatenation.
    """

    def __init__(self, call: MeshCall, rid: str, created: int, model: str) -> None:
        self.chat, self.include_usage = call.endpoint == "chat", call.include_usage
        dumps = _dumps
        head = {"id": f"{'chatcmpl' if self.chat else 'cmpl'}-{rid}",
                "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": created, "model": model, "system_fingerprint": None}
        self._head = b"data: " + dumps(head)[:-1] + b',"choices":[{"index":0,'
        tail = b',"usage":null' if self.include_usage else b""
        if self.chat:
            self._pre, self._post = self._head + b'"delta":{"content":', b'},"logprobs":null,"finish_reason":null}]'
        else:
            self._pre, self._post = self._head + b'"text":', b',"logprobs":null,"finish_reason":null}]'
        self._post += tail + b"}\n\n"
        self._tail = tail
        self._head_json = head

    def start(self) -> bytes:
        """The first event: the assistant's role (chat only)."""
        if not self.chat:
            return b""
        return self._head + b'"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]' \
            + self._tail + b"}\n\n"

    def text(self, text: str) -> bytes:
        return self._pre + _dumps(text) + self._post

    def finish(self, finish_reason: str, tail_text: str = "") -> bytes:
        """The chunk with the finish reason (and the text the mesh held back to the end, if any)."""
        if self.chat:
            delta = b'{"content":' + _dumps(tail_text) + b"}" if tail_text else b"{}"
            body = b'"delta":' + delta
        else:
            body = b'"text":' + _dumps(tail_text)
        return (self._head + body + b',"logprobs":null,"finish_reason":' + _dumps(finish_reason) + b"}]"
                + self._tail + b"}\n\n")

    def usage(self, usage: dict[str, int]) -> bytes:
        """The extra last chunk of ``stream_options.include_usage``: no choices, the usage."""
        return b"data: " + _dumps({**self._head_json, "choices": [], "usage": usage}) + b"\n\n"

    @staticmethod
    def error(err: APIError) -> bytes:
        """An error after the stream began (its status was already sent); the openai package raises it."""
        return b"data: " + _dumps(err.body()) + b"\n\n"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
