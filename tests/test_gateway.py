"""The OpenAI-compatible gateway in front of a mesh of real node processes.

Real things only: Mosquitto, three ``meshllm node`` processes serving a pinned
PREFILL/DECODE plan, the gateway as its own process (uvicorn on a free
loopback port), the official ``openai`` package, and curl running the
examples of docs/gateway.md exactly as written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshllm.gateway import openai_api as oa
from meshllm.gateway.meshview import MeshView
from meshllm.mesh.broker import BrokerURL
from meshllm.model.export import export
from meshllm.runtime.generate import LocalModel
from meshllm.runtime.sampling import SamplingParams
from tests.mesh_harness import mosquitto, wait_until
from tests.serving_harness import replica, serving_mesh

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key-" + secrets.token_hex(4)
MODEL = "tiny-chat"
CONTEXT = 256
PLAN = {"version": 1, "n_layers": 4, "replicas": [
    replica(0, "prefill", [("n1", 0, 4)], context=CONTEXT),
    replica(1, "decode", [("n2", 0, 2), ("n3", 2, 4)], context=CONTEXT)]}
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]
PROMPT = "Once upon a time"

# --- a small Hugging Face-style model with a chat template, written with numpy (no torch) -------------

_CORPUS = ["The quick brown fox jumps over the lazy dog.",
           "Once upon a time there was a little robot who lived on a mesh of tiny computers.",
           "Héllo wörld! Ünïcödé, emoji 🙂 and 中文 too."]
_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_chat_checkpoint(out: Path, layers: int = 4, vocab: int = 300, seed: int = 0) -> Path:
    """A random Llama checkpoint in Hugging Face's layout (config.json, safetensors, tokenizer.json with a
    chat template): what tests/hf_models.py writes, without the seconds that importing torch takes."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out.mkdir(parents=True, exist_ok=True)
    dim, ffn, heads, kv = 64, 112, 4, 2
    hd = dim // heads
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dim, "intermediate_size": ffn,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
        "max_position_embeddings": CONTEXT, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"}))
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return rng.normal(0, 0.15, shape).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return rng.normal(1, 0.1, n).astype(np.float32)

    t = {"model.embed_tokens.weight": w(vocab, dim), "model.norm.weight": norm(dim), "lm_head.weight": w(vocab, dim)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": norm(dim), p + "post_attention_layernorm.weight": norm(dim),
                  p + "self_attn.q_proj.weight": w(heads * hd, dim), p + "self_attn.k_proj.weight": w(kv * hd, dim),
                  p + "self_attn.v_proj.weight": w(kv * hd, dim), p + "self_attn.o_proj.weight": w(dim, heads * hd),
                  p + "mlp.gate_proj.weight": w(ffn, dim), p + "mlp.up_proj.weight": w(ffn, dim),
                  p + "mlp.down_proj.weight": w(dim, ffn)})
    save_file(t, str(out / "model.safetensors"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_CORPUS * 20, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": False,
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": _TEMPLATE}))
    return out


# --- the pure parts: OpenAI JSON <-> mesh calls, and the mesh as the gateway sees it -------------------


@settings(max_examples=200, deadline=None)
@given(st.text(), st.sampled_from(["chat", "completions"]), st.booleans())
def test_sse_events_are_json_that_carries_the_text_exactly(text: str, endpoint: str, usage: bool) -> None:
    body = {"model": "m", "stream": True, **({"stream_options": {"include_usage": True}} if usage else {}),
            **({"messages": [{"role": "user", "content": "x"}]} if endpoint == "chat" else {"prompt": "x"})}
    call = (oa.parse_chat if endpoint == "chat" else oa.parse_completion)(json.dumps(body).encode())
    enc = oa.SSEEncoder(call, "r1", 7, "m\"odel")
    events = [enc.start(), enc.text(text), enc.finish("stop", text), enc.usage(oa.usage_json(1, 2))]
    parsed = [json.loads(e.removeprefix(b"data: ")) for e in events if e]
    assert all(e.endswith(b"\n\n") and e.count(b"\n\n") == 1 for e in events if e)
    key = "delta" if endpoint == "chat" else None
    got = [p["choices"][0][key].get("content", "") if key else p["choices"][0]["text"] for p in parsed if p["choices"]]
    assert got[-2:] == [text, text]
    assert all(p["model"] == 'm"odel' and p["id"].endswith("-r1") for p in parsed)
    assert ("usage" in parsed[0]) == usage and parsed[-1]["usage"]["total_tokens"] == 3


def test_openai_fields_become_client_arguments_with_openai_defaults() -> None:
    call = oa.parse_chat(json.dumps({"model": "m", "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
        {"role": "user", "content": "hi", "name": "ann"}], "stop": "\n", "seed": 3, "user": "u1"}).encode())
    assert call.params == {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                           "temperature": 1.0, "top_p": 1.0, "seed": 3, "stop": ["\n"], "max_tokens": None}
    assert not call.stream and call.endpoint == "chat"
    legacy = oa.parse_completion(b'{"model": "m", "prompt": ["once"], "max_tokens": null}')
    assert legacy.params["prompt"] == "once" and legacy.params["max_tokens"] == 16  # OpenAI's legacy default
    both = oa.parse_chat(b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5, '
                         b'"max_completion_tokens": 7}')
    assert both.params["max_tokens"] == 7


def test_mesh_error_codes_map_to_http_statuses() -> None:
    assert {c: oa.mesh_error(c, "m").status for c in ("invalid_json", "invalid_request", "context_length_exceeded",
                                                       "busy", "unavailable", "internal_error", "timeout")} == {
        "invalid_json": 400, "invalid_request": 400, "context_length_exceeded": 400, "busy": 429,
        "unavailable": 503, "internal_error": 500, "timeout": 504}
    assert oa.mesh_error("busy", "m").headers()["retry-after"] == oa.mesh_error("unavailable", "m").headers()[
        "retry-after"] == str(oa.RETRY_AFTER_S)
    assert oa.mesh_error("invalid_request", "m").headers() == {}


def test_mesh_view_serves_only_when_a_prefill_and_a_decode_replica_are_ready() -> None:
    view = MeshView("home")
    t = "meshllm/v1/home"

    def put(topic: str, obj: Any) -> None:
        view.apply(f"{t}/{topic}", json.dumps(obj).encode() if obj is not None else b"", 0.0)
    assert view.unavailable_reason() is None  # not synced yet: let the mesh answer
    view.synced = True
    assert view.unavailable_reason().startswith("no node")  # type: ignore[union-attr]
    for n in ("a", "b"):
        put(f"members/{n}", {"node_id": n, "model": "dir-name", "profile": {}})
    put("planner", {"node": "a", "term": 2})
    put("plan", {"version": 3, "model": "tiny", "n_layers": 2, "replicas": [
        {"id": 0, "role": "prefill", "context": 512, "stages": [{"node_id": "a", "start": 0, "stop": 2}]},
        {"id": 1, "role": "decode", "context": 256, "stages": [{"node_id": "b", "start": 0, "stop": 2}]}]})
    assert "no replica" in view.unavailable_reason()  # type: ignore[operator]
    put("ready/a", {"pv": 3, "r": 0})
    put("ready/b", {"pv": 2, "r": 1})  # an older plan's readiness does not count
    assert view.ready_replicas() == [0] and view.unavailable_reason() is not None
    put("ready/b", {"pv": 3, "r": 1})
    assert view.ready_replicas() == [0, 1] and view.unavailable_reason() is None
    model = view.model()
    assert model is not None and model.id == "tiny" and model.accepts("dir-name") and model.context_length == 256
    put("members/b", None)  # b left: its replica is not ready any more
    assert view.ready_replicas() == [0] and view.unavailable_reason() is not None
    snap = view.snapshot(0.0)
    assert [r["ready"] for r in snap["plan"]["replicas"]] == [True, False] and snap["planner"] == "a"
    view.apply(f"{t}/plan", b"{not json", 0.0)  # ignored
    assert view.plan is not None


# --- the gateway as a process ---------------------------------------------------------------------------


class GatewayProc:
    """``python -m meshllm.gateway`` (the same code as ``meshllm gateway``) on a free loopback port."""

    def __init__(self, mesh: str, broker: str, *extra: str, log_dir: Path) -> None:
        self.log_path = log_dir / f"gateway-{mesh}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "meshllm.gateway", "-v", "--mesh", mesh, "--broker", broker,
                                      "--port", "0", *extra], stdout=subprocess.PIPE, stderr=self._log, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the gateway exited: {self.log_path.read_text()[-3000:]}")
        event = json.loads(line)
        assert event["event"] == "started"
        self.url: str = event["url"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise AssertionError("the gateway ignored SIGTERM for 10 s") from None
        self._log.close()


def http(method: str, url: str, body: bytes | dict[str, Any] | None = None, key: str | None = KEY,
         timeout: float = 30.0) -> tuple[int, dict[str, str], Any]:
    """One HTTP request with the standard library; returns status, headers and the parsed JSON body."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, headers, raw = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        status, headers, raw = e.code, dict(e.headers), e.read()
    return status, {k.lower(): v for k, v in headers.items()}, json.loads(raw) if raw else None


class RawStream:
    """A streamed POST over a raw asyncio connection, so that a test can read a few events and hang up."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.status, self.headers = 0, {}

    @classmethod
    async def open(cls, url: str, path: str, body: dict[str, Any]) -> RawStream:
        s = await cls.send(url, path, body)
        await s.head()
        return s

    @classmethod
    async def send(cls, url: str, path: str, body: dict[str, Any]) -> RawStream:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        data = json.dumps(body).encode()
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        await writer.drain()
        return cls(reader, writer)

    async def head(self) -> None:
        """The status line and headers (for a stream: sent once the mesh's first reply is in)."""
        self.status = int((await self.reader.readline()).split()[1])
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            self.headers[k.strip().lower()] = v.strip()

    async def body(self) -> bytes:
        """The rest of the body (chunked or with a length)."""
        if "content-length" in self.headers:
            return await self.reader.readexactly(int(self.headers["content-length"]))
        return b"".join([c async for c in self.chunks()])

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            size = int((await self.reader.readline()).strip(), 16)
            if size == 0:
                return
            yield await self.reader.readexactly(size)
            await self.reader.readexactly(2)

    async def events(self) -> AsyncIterator[str]:
        buf = b""
        async for c in self.chunks():
            buf += c
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                yield event.decode().removeprefix("data: ")

    def close(self) -> None:
        self.writer.close()


# --- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broker() -> Iterator[str]:
    with mosquitto() as url:
        yield url


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gwmodel")
    export(write_chat_checkpoint(root / "src" / MODEL), root / MODEL, overwrite=True)
    return root / MODEL


@pytest.fixture(scope="module")
def mesh(broker: str, model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    name = f"t-gw-{secrets.token_hex(3)}"
    with serving_mesh(name, broker, model, ["n1", "n2", "n3"], PLAN, tmp_path_factory.mktemp("gwplan")):
        yield name


@pytest.fixture(scope="module")
def gateway(mesh: str, broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    gw = GatewayProc(mesh, broker, "--api-key", KEY, log_dir=tmp_path_factory.mktemp("gwlog"))
    try:
        wait_until(lambda: http("GET", f"{gw.url}/v1/models")[2]["data"], 10, "the gateway to learn the model")
        yield gw.url
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def client(gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=KEY, max_retries=0, timeout=60)


def greedy(model: Path, prompt: str | list[int], n: int) -> tuple[str, int, str]:
    done = LocalModel(model).generate(prompt, SamplingParams(max_tokens=n, temperature=0))
    return done.text, len(done.token_ids), str(done.finish_reason)


def meshllm_generate(model: Path, prompt: str, n: int) -> str:
    out = subprocess.run([sys.executable, "-m", "meshllm", "generate", prompt, "--model", str(model),
                          "--max-tokens", str(n), "--temperature", "0", "--json", "--threads", "1"],
                         capture_output=True, text=True, timeout=60, check=True)
    return str(json.loads(out.stdout)["text"])


def chat_ids(model: Path, messages: list[dict[str, str]]) -> list[int]:
    """The prompt ids the mesh makes of a chat: the model's template, its BOS from the template itself."""
    tok = LocalModel(model).tokenizer
    return tok.encode(tok.apply_chat_template(messages), bos=False)


# --- the OpenAI API ---------------------------------------------------------------------------------------


def test_models_lists_the_mesh_model_with_its_context_length(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra is not None and models[0].model_extra["context_length"] == CONTEXT
    assert client.models.retrieve(MODEL).id == MODEL


def test_openai_completions_equal_meshllm_generate_streamed_and_whole(client: openai.OpenAI, model: Path) -> None:
    want = meshllm_generate(model, PROMPT, 20)
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0)
    assert whole.choices[0].text == want
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 20
    assert whole.usage.prompt_tokens == len(LocalModel(model).encode_prompt(PROMPT))
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_openai_chat_equals_local_greedy_streamed_and_whole(client: openai.OpenAI, model: Path) -> None:
    ids = chat_ids(model, CHAT)
    want, n, reason = greedy(model, ids, 24)
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0)  # type: ignore[arg-type]
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == want
    assert whole.choices[0].finish_reason == reason
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(ids), n)
    assert whole.usage.total_tokens == len(ids) + n

    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=24,  # type: ignore[arg-type]
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == [reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None  # usage comes last, alone
    assert chunks[-1].usage.completion_tokens == n
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


def test_stream_ends_with_done_and_without_usage_unless_asked(gateway: str, model: Path) -> None:
    async def go() -> list[str]:
        s = await RawStream.open(gateway, "/v1/chat/completions", {
            "model": MODEL, "messages": CHAT, "max_tokens": 6, "temperature": 0, "stream": True})
        assert s.status == 200 and s.headers["content-type"].startswith("text/event-stream")
        try:
            return [e async for e in s.events()]
        finally:
            s.close()
    events = asyncio.run(go())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


# --- errors ------------------------------------------------------------------------------------------------


BAD = [  # (what, body, status, param or code to find)
    ("invalid JSON", b'{"model": "tiny-chat", "messages": [', 400, "invalid_json"),
    ("not an object", b"[1, 2]", 400, "invalid_json"),
    ("unknown model", {"model": "gpt-4o", "messages": CHAT}, 404, "model_not_found"),
    ("no model", {"messages": CHAT}, 400, "model"),
    ("negative max_tokens", {"model": MODEL, "messages": CHAT, "max_tokens": -5}, 400, "max_tokens"),
    ("zero max_completion_tokens", {"model": MODEL, "messages": CHAT, "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    ("no messages", {"model": MODEL}, 400, "messages"),
    ("empty messages", {"model": MODEL, "messages": []}, 400, "messages"),
    ("message without content", {"model": MODEL, "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("tool role", {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    ("temperature too high", {"model": MODEL, "messages": CHAT, "temperature": 3}, 400, "temperature"),
    ("n > 1", {"model": MODEL, "messages": CHAT, "n": 2}, 400, "n"),
    ("unknown field", {"model": MODEL, "messages": CHAT, "colour": "red"}, 400, "colour"),
    ("top_p 0 (the mesh's rule)", {"model": MODEL, "messages": CHAT, "top_p": 0}, 400, "invalid_request"),
    ("prompt longer than the context (the mesh's answer)",
     {"model": MODEL, "messages": [{"role": "user", "content": "fox " * 400}]}, 400, "context_length_exceeded"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_bad_input_gets_openai_errors_and_the_gateway_keeps_serving(gateway: str, client: openai.OpenAI,
                                                                    model: Path, stream: bool) -> None:
    for what, body, status, where in BAD:
        if isinstance(body, dict) and stream:
            body = {**body, "stream": True}
        got, headers, err = http("POST", f"{gateway}/v1/chat/completions", body)
        assert got == status, (what, err)
        assert set(err["error"]) == {"message", "type", "param", "code"}, what
        assert where in (err["error"]["param"], err["error"]["code"]), (what, err)
        assert err["error"]["message"], what
        assert headers["content-type"] == "application/json", what
    # the openai package maps them to its exceptions
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=CHAT)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=-1)
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0).choices[0].text == \
        greedy(model, PROMPT, 5)[0]


def test_wrong_or_missing_api_key_gets_401(gateway: str) -> None:
    for key in ("wrong", None, ""):
        for method, path in (("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
                             ("GET", "/v1/mesh")):
            status, _, err = http(method, f"{gateway}{path}", {"model": MODEL, "prompt": "x"}
                                  if method == "POST" else None, key=key)
            assert status == 401, (key, path)
            assert err["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=f"{gateway}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert http("GET", f"{gateway}/v1/models")[0] == 200


def test_unknown_path_and_method_get_openai_errors(gateway: str) -> None:
    status, _, err = http("POST", f"{gateway}/v1/embeddings", {"model": MODEL, "input": "x"})
    assert status == 404 and "Invalid URL" in err["error"]["message"]
    status, _, err = http("GET", f"{gateway}/v1/chat/completions")
    assert status == 405 and err["error"]["type"] == "invalid_request_error"


def test_no_ready_replica_gets_503_with_retry_after(broker: str, tmp_path: Path) -> None:
    gw = GatewayProc(f"t-gw-empty-{secrets.token_hex(3)}", broker, log_dir=tmp_path)  # a mesh with no node
    try:
        def answer() -> tuple[int, dict[str, str], Any]:
            return http("POST", f"{gw.url}/v1/chat/completions", {"model": MODEL, "messages": CHAT}, key=None,
                        timeout=10)
        status, headers, err = wait_until(lambda: (r := answer()) and r[2]["error"]["message"].startswith("no node")
                                          and r, 10, "the gateway to read the (empty) mesh")
        assert status == 503 and int(headers["retry-after"]) > 0
        assert err["error"]["code"] == "unavailable"
        assert http("GET", f"{gw.url}/v1/models", key=None)[2]["data"] == []
        assert http("GET", f"{gw.url}/v1/mesh", key=None)[2]["unavailable"].startswith("no node")
    finally:
        gw.stop()


# --- cancellation and back-pressure ------------------------------------------------------------------------


async def _watch(broker: str, topics: list[str]) -> tuple[aiomqtt.Client, contextlib.AsyncExitStack]:
    stack = contextlib.AsyncExitStack()
    c = await stack.enter_async_context(aiomqtt.Client(**BrokerURL.parse(broker).client_kwargs()))
    for t in topics:
        await c.subscribe(t, qos=1)
    return c, stack


async def _final_reply(c: aiomqtt.Client, timeout: float) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        async for m in c.messages:
            d = json.loads(m.payload)  # type: ignore[arg-type]
            if d.get("done") or d.get("error"):
                return dict(d)
        raise AssertionError("unreachable")
    return await asyncio.wait_for(go(), timeout)


def test_client_that_disconnects_cancels_its_mesh_request(gateway: str, broker: str, mesh: str) -> None:
    async def go() -> None:
        s = await RawStream.open(gateway, "/v1/chat/completions", {
            "model": MODEL, "messages": CHAT, "temperature": 0, "stream": True})  # no max_tokens: fill the context
        assert s.status == 200
        rid = s.headers["x-request-id"]
        watch, stack = await _watch(broker, [f"meshllm/v1/{mesh}/replies/{rid}"])
        async with stack:
            events = aiter(s.events())
            for _ in range(3):
                await anext(events)
            s.close()  # the HTTP client goes away mid-answer
            final = await _final_reply(watch, 10)
        assert final["finish_reason"] == "cancelled", final
        assert final["usage"]["completion_tokens"] < CONTEXT - 30  # it stopped long before the context was full
    asyncio.run(go())


def test_full_mesh_queue_gets_429_and_hung_up_clients_free_it(gateway: str, client: openai.OpenAI,
                                                              model: Path) -> None:
    """4 decode slots and a queue of 64: of 80 long requests at once some are refused with 429 (busy).
    Then every client hangs up; the mesh cancels what they asked for and serves the next request at once."""
    async def go() -> None:
        streams = await asyncio.gather(*(RawStream.send(gateway, "/v1/completions", {
            "model": MODEL, "prompt": f"{PROMPT} {i}", "max_tokens": 200, "temperature": 0, "stream": True})
            for i in range(80)))
        heads = {asyncio.ensure_future(s.head()): s for s in streams}
        refused: list[RawStream] = []
        deadline = time.monotonic() + 30
        while heads and time.monotonic() < deadline:
            done, _ = await asyncio.wait(heads, timeout=0.5 if refused else 1.0, return_when=asyncio.FIRST_COMPLETED)
            if not done and refused:
                break  # the rest wait in the mesh's queue (their status comes with their first token)
            for f in done:
                s = heads.pop(f)
                f.result()
                if s.status == 429:
                    refused.append(s)
        assert refused, "no request was refused with 429"
        assert len(refused) < 80 - 64
        for s in refused:
            err = json.loads(await s.body())
            assert err["error"]["code"] == "busy" and err["error"]["type"] == "rate_limit_error"
            assert int(s.headers["retry-after"]) > 0
        for f, s in heads.items():  # the clients whose requests wait in the mesh's queue hang up...
            f.cancel()
            s.close()
        await asyncio.gather(*heads, return_exceptions=True)
        await asyncio.to_thread(wait_until, lambda: (sc := http("GET", f"{gateway}/v1/mesh")[2]["scheduler"])
                                and sc["queued"] == 0, 10, "the mesh's queue to empty")
        # ...then those being answered. In this order because a queued request dispatched into a decode slot
        # as it is freed can race in the mesh today: a stage may get its KV before the old request's release
        # ("segment is full"), which this test is not about.
        for s in streams:
            s.close()

    asyncio.run(go())
    t0 = time.monotonic()
    text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0).choices[0].text
    assert text == greedy(model, PROMPT, 5)[0]
    assert time.monotonic() - t0 < 10  # not behind 64 requests that nobody reads


# --- the docs --------------------------------------------------------------------------------------------


def curl_examples() -> list[str]:
    """The shell blocks of docs/gateway.md (and README.md, once it has them) that call the gateway."""
    out = []
    for doc in (ROOT / "docs" / "gateway.md", ROOT / "README.md"):
        if doc.exists():
            out += [b for b in re.findall(r"```sh\n(.*?)```", doc.read_text(), re.S) if "$GATEWAY" in b and "curl" in b]
    return out


def test_docs_curl_examples_work_as_written(gateway: str) -> None:
    assert shutil.which("curl") and shutil.which("jq"), "apt-get install curl jq (.ci/run does)"
    blocks = curl_examples()
    assert len(blocks) >= 4
    env = {**os.environ, "GATEWAY": gateway, "MESHLLM_API_KEY": KEY}
    setup = "set -euo pipefail\n"
    for block in blocks:
        out = subprocess.run(["bash", "-c", setup + block], capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 0, (block, out.stderr)
        assert out.stdout.strip(), block
        if "MODEL=" in block:  # the block that finds the model defines it for those after it
            setup += "".join(line + "\n" for line in block.splitlines() if line.startswith(("MODEL=", "export ")))
        if '"stream": true' in block:
            assert out.stdout.rstrip().endswith("data: [DONE]"), out.stdout
        elif "-w '%{http_code}" in block or "-i" in block.split():
            assert re.search(r"\b(4\d\d)\b", out.stdout), out.stdout
        else:
            assert "error" not in out.stdout, out.stdout
