"""Tokenizers behind one small interface: llama2.c's ``tokenizer.bin`` and Hugging Face ``tokenizer.json``.

The llama2.c tokenizer reproduces ``run.c``'s ``encode``/``decode`` exactly so
that prompts give the same ids as the reference; the Hugging Face one gives the
same ids and text as ``transformers.AutoTokenizer`` for the same files.
:class:`StreamDecoder` turns generated ids into text incrementally without ever
emitting half of a UTF-8 character.
"""

from __future__ import annotations

import abc
import datetime
import heapq
import json
import os
import re
import struct
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from meshllm.errors import TokenizerError

__all__ = [
    "Tokenizer",
    "CHATML_TEMPLATE",
    "render_chat_template",
    "read_chat_template",
    "Llama2cTokenizer",
    "HFTokenizer",
    "StreamDecoder",
    "load_tokenizer",
    "write_tokenizer_bin",
    "random_llama2c_vocab",
]


# The chat template of a model that has none: ChatML, as llama.cpp's server falls back to, after the model's BOS
# (rendered as text and encoded without special tokens, so "<s>" becomes the BOS id where the model has one).
CHATML_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
FALLBACK_TEMPLATE_NAME = "chatml (fallback)"
MODEL_TEMPLATE_NAME = "the model's own"


class Tokenizer(abc.ABC):
    """Text <-> token ids for one model."""

    vocab_size: int
    bos_id: int | None
    eos_ids: tuple[int, ...]
    chat_template: str | None = None  # the model's own (Jinja), if it has one
    bos_token: str | None = None  # the special tokens as text, for chat templates
    eos_token: str | None = None

    @abc.abstractmethod
    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        """Ids of ``text``, starting with BOS when ``bos`` (and the model uses one)."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int], prev: int | None = None) -> str:
        """Text of generated ``ids``; ``prev`` is the id before them, if it matters."""

    @property
    def chat_template_name(self) -> str:
        """Which template chats get: the model's own, or the ChatML fallback."""
        return MODEL_TEMPLATE_NAME if self.chat_template is not None else FALLBACK_TEMPLATE_NAME

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for a chat, ending with the assistant's turn: with the model's own template, else
        ChatML (:data:`CHATML_TEMPLATE`). Encode it with ``bos=False``: the template places the BOS."""
        return render_chat_template(self.chat_template or CHATML_TEMPLATE, messages,
                                    bos_token=self.bos_token or "", eos_token=self.eos_token or "")


# --------------------------------------------------------------------------- llama2.c

_BOS = 1  # run.c hard-codes these
_EOS = 2
_BYTE_OFFSET = 3  # byte fallback: id = byte + 3
_NO_MERGE = float(np.float32(-1e10))  # run.c's initial best_score; a merge must beat it
_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")


class Llama2cTokenizer(Tokenizer):
    """``run.c``'s tokenizer: byte-fallback BPE driven by piece scores."""

    def __init__(self, pieces: Sequence[bytes], scores: Sequence[float], *, source: str = "<memory>") -> None:
        if len(pieces) != len(scores):
            raise TokenizerError(f"{source}: {len(pieces)} pieces but {len(scores)} scores")
        self.source = source
        self.pieces = [bytes(p) for p in pieces]
        self.scores = [float(np.float32(s)) for s in scores]
        self.vocab_size = len(self.pieces)
        self.bos_id = _BOS
        self.eos_ids = (_EOS,)
        self._ids: dict[bytes, int] = {}
        for i, piece in enumerate(self.pieces):
            self._ids.setdefault(piece, i)  # duplicates: run.c's bsearch picks any; we pick the first
        self._text = [_raw_bytes(p) for p in self.pieces]
        self._text_after_bos = [_raw_bytes(p[1:] if p[:1] == b" " else p) for p in self.pieces]

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], vocab_size: int) -> Llama2cTokenizer:
        """Read ``vocab_size`` entries of a llama2.c ``tokenizer.bin``."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise TokenizerError(f"{path}: cannot read llama2.c tokenizer: {e}") from e
        if len(data) < 4:
            raise TokenizerError(f"{path}: too short for a llama2.c tokenizer header")
        pieces: list[bytes] = []
        scores: list[float] = []
        off = 4  # skip max_token_length; run.c only sizes a buffer with it
        for i in range(vocab_size):
            if off + 8 > len(data):
                raise TokenizerError(
                    f"{path}: ends at token {i} but the model's vocab_size is {vocab_size} "
                    "(tokenizer.bin does not belong to this checkpoint?)"
                )
            score, length = struct.unpack_from("<fi", data, off)
            off += 8
            if length < 0 or off + length > len(data):
                raise TokenizerError(f"{path}: token {i} has a bad length {length}")
            pieces.append(data[off : off + length])
            scores.append(score)
            off += length
        return cls(pieces, scores, source=str(path))

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        ids = [_BOS] if bos else []
        if text:
            space = self._ids.get(b" ")
            if space is None:
                raise TokenizerError(f"{self.source}: no ' ' piece for the dummy prefix")
            ids.append(space)
        for ch in text:
            # One codepoint is exactly what run.c's continuation-byte loop groups.
            raw = ch.encode("utf-8", "surrogatepass")
            tid = self._ids.get(raw)
            if tid is not None:
                ids.append(tid)
            else:
                ids.extend(b + _BYTE_OFFSET for b in raw)
        if ids and max(ids) >= self.vocab_size:
            raise TokenizerError(f"{self.source}: vocab of {self.vocab_size} has no byte-fallback pieces")
        return self._merge(ids)

    def _pair_id(self, left: int, right: int) -> int | None:
        tid = self._ids.get(self.pieces[left] + self.pieces[right])
        if tid is None or not self.scores[tid] > _NO_MERGE:
            return None
        return tid

    def _merge(self, tokens: list[int]) -> list[int]:
        """run.c's merge loop in O(n log n).

        run.c repeatedly merges the best-scoring adjacent pair, the leftmost on
        ties.  Merged nodes keep their left position, so a heap ordered by
        (-score, position) with stale entries skipped makes the same choices.
        """
        n = len(tokens)
        if n < 2:
            return tokens
        tokens = list(tokens)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap: list[tuple[float, int, int, int, int]] = []

        def push(i: int) -> None:
            j = nxt[i] if i >= 0 else -1
            if j < 0:
                return
            tid = self._pair_id(tokens[i], tokens[j])
            if tid is not None:
                heapq.heappush(heap, (-self.scores[tid], i, tokens[i], tokens[j], tid))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, left, right, tid = heapq.heappop(heap)
            j = nxt[i]
            if not alive[i] or j < 0 or tokens[i] != left or tokens[j] != right:
                continue  # stale: one side has been merged since
            tokens[i] = tid
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] >= 0:
                prv[nxt[j]] = i
            push(prv[i])
            push(i)
        return [t for t, a in zip(tokens, alive) if a]

    def piece_bytes(self, token: int, prev: int | None = None) -> bytes:
        """run.c's ``decode(prev, token)``: raw byte for ``<0xHH>``, no leading space after BOS."""
        if not 0 <= token < self.vocab_size:
            raise TokenizerError(f"{self.source}: token id {token} outside vocab of {self.vocab_size}")
        return (self._text_after_bos if prev == _BOS else self._text)[token]

    def decode(self, ids: Sequence[int], prev: int | None = None) -> str:
        out = bytearray()
        for tid in ids:
            out += self.piece_bytes(int(tid), prev)
            prev = int(tid)
        return out.decode("utf-8", errors="replace")


def _raw_bytes(piece: bytes) -> bytes:
    m = _BYTE_PIECE.fullmatch(piece)
    return bytes([int(m.group(1), 16)]) if m else piece


def write_tokenizer_bin(path: str | os.PathLike[str], pieces: Sequence[bytes], scores: Sequence[float]) -> None:
    """Write a llama2.c ``tokenizer.bin`` (the inverse of :meth:`Llama2cTokenizer.from_file`)."""
    if len(pieces) != len(scores):
        raise TokenizerError(f"{path}: {len(pieces)} pieces but {len(scores)} scores")
    parts = [struct.pack("<i", max((len(p) for p in pieces), default=0))]
    for piece, score in zip(pieces, scores):
        parts.append(struct.pack("<fi", score, len(piece)))
        parts.append(bytes(piece))
    Path(path).write_bytes(b"".join(parts))


_CORPUS = """
Once upon a time there was a little girl who lived in a small house near the
forest. Every morning she walked to the river with her dog, and they watched the
water running over the stones. One day the dog found a shiny red ball under a
tree. The girl was very happy and they played together until the sun went down.
Her mother called her home for dinner, and she told her about the ball and the
birds singing in the trees. "It was the best day ever," she said with a smile.
The next morning it was raining, so they stayed inside and read a book about a
brave knight, a friendly dragon and a king who wanted to find the biggest apple
in the whole world. They laughed at the funny pictures and drank warm milk.
In the evening the rain stopped, the sky turned orange and pink, and the little
girl went outside again. She saw a rainbow over the hills and wanted to touch
it. Her friend Tom came running: "Look! Can you see the colors?" They counted
red, orange, yellow, green, blue and purple, then they sat on the grass and
talked about the things they would do tomorrow. Tom said he would build a boat,
and she said she would paint the boat with all the colors of the rainbow.
The quick brown fox jumps over the lazy dog while 3 cats sleep in the sun. At
10:30 the children ate 2 cookies each; it's nice, isn't it? We don't know why
the café was closed, but the naïve baker smiled — and everyone was happy again.
Learning to read, write and count is something that people do when they are
young; computers learn from text, numbers and examples, and they try to predict
the next word in a sentence so that the story keeps going.
"""


@lru_cache(maxsize=1)
def _learned_vocab() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(alphabet by frequency, BPE merges in learned order) of the built-in corpus."""
    words = Counter(" " + w for w in _CORPUS.split())
    chars: Counter[str] = Counter()
    for word, count in words.items():
        for ch in word:
            chars[ch] += count
    alphabet = sorted(chars, key=lambda c: (c != " ", -chars[c], c))
    splits = {word: list(word) for word in words}
    seen = set(alphabet)
    merges: list[str] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, syms in splits.items():
            for a, b in zip(syms, syms[1:]):
                pairs[a, b] += words[word]
        if not pairs:
            break
        (a, b), count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if count < 2:
            break
        merged = a + b
        if merged not in seen:
            seen.add(merged)
            merges.append(merged)
        for syms in splits.values():
            i = 0
            while i < len(syms) - 1:
                if syms[i] == a and syms[i + 1] == b:
                    syms[i : i + 2] = [merged]
                i += 1
    return tuple(alphabet), tuple(merges)


def random_llama2c_vocab(vocab_size: int, seed: int = 0) -> tuple[list[bytes], list[float]]:
    """A llama2-shaped vocab for tests and benchmarks: ``(pieces, scores)``.

    Ids 0-2 are ``<unk>``, ``\\n<s>\\n``, ``\\n</s>\\n``; 3-258 the byte pieces
    ``<0x00>``..``<0xFF>``; then ``" "`` and the most frequent characters of a
    built-in English text, then BPE merges learned on it (earlier merges score
    higher), then — for large vocabs — ``seed``-dependent concatenations of
    existing word pieces, so every piece is reachable by merging.
    """
    base = _BYTE_OFFSET + 256
    if vocab_size < base + 1:
        raise ValueError(f"vocab_size must be at least {base + 1}, got {vocab_size}")
    alphabet, merges = _learned_vocab()
    free = vocab_size - base
    n_chars = min(len(alphabet), max(1, free // 2))
    allowed = set(alphabet[:n_chars])
    words = list(alphabet[:n_chars])
    words += [m for m in merges if set(m) <= allowed][: free - n_chars]
    present = set(words)
    wordy = [w for w in words if w.strip() and all(c == " " or c.isalpha() for c in w)]
    rng = np.random.default_rng(seed)
    while len(words) < free:
        for i, j in rng.integers(0, len(wordy), size=(free - len(words), 2)).tolist():
            piece = wordy[i] + wordy[j].lstrip(" ")
            if piece not in present:
                present.add(piece)
                words.append(piece)
                if len(piece) <= 8:  # keeps every piece at most 16 characters
                    wordy.append(piece)
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    pieces += [w.encode("utf-8") for w in words]
    scores = [0.0] * base + [-float(rank) for rank in range(len(words))]
    return pieces, scores


# --------------------------------------------------------------------------- Hugging Face


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or a serialized AddedToken."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class HFTokenizer(Tokenizer):
    """A ``tokenizer.json`` set up the way ``transformers.AutoTokenizer`` sets it up."""

    def __init__(
        self,
        tokenizer: Any,
        config: dict[str, Any] | None = None,
        *,
        chat_template: str | None = None,
        source: str = "<memory>",
    ) -> None:
        from tokenizers import AddedToken

        config = config or {}
        self.source = source
        self._tok = tokenizer
        self.chat_template = chat_template
        self.bos_token = _token_content(config.get("bos_token"))
        self.eos_token = _token_content(config.get("eos_token"))
        # transformers registers the named special tokens as special added tokens.
        specials = [
            _token_content(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        ]
        added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        new = [AddedToken(t, special=True, normalized=False) for t in specials if t and t not in added]
        if new:
            tokenizer.add_special_tokens(new)
        self.bos_id = self._id_of(self.bos_token)
        eos_id = self._id_of(self.eos_token)
        self.eos_ids = (eos_id,) if eos_id is not None else ()
        # The post-processor in tokenizer.json alone decides whether BOS/EOS are
        # added: transformers 5 drops tokenizer_config's add_bos_token/add_eos_token
        # whenever a tokenizer.json exists, so honouring them here would double BOS.
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @classmethod
    def from_dir(
        cls,
        model_dir: str | os.PathLike[str],
        tokenizer_file: str = "tokenizer.json",
        config_file: str | None = "tokenizer_config.json",
    ) -> HFTokenizer:
        """Load ``tokenizer.json`` (+ ``tokenizer_config.json`` and chat template when present)."""
        from tokenizers import Tokenizer as RawTokenizer

        model_dir = Path(model_dir)
        path = model_dir / tokenizer_file
        try:
            raw = RawTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise TokenizerError(f"{path}: cannot load Hugging Face tokenizer: {e}") from e
        config: dict[str, Any] = {}
        if config_file is not None and (model_dir / config_file).is_file():
            cpath = model_dir / config_file
            try:
                config = json.loads(cpath.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise TokenizerError(f"{cpath}: cannot read tokenizer config: {e}") from e
            if not isinstance(config, dict):
                raise TokenizerError(f"{cpath}: tokenizer config is not a JSON object")
        # Like transformers, a separate chat_template.jinja wins over the config's entry.
        jinja_file = model_dir / "chat_template.jinja"
        if jinja_file.is_file():
            template: str | None = jinja_file.read_text(encoding="utf-8")
        else:
            template = _pick_template(config.get("chat_template"))
        return cls(raw, config, chat_template=template, source=str(path))

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        """``bos=True``: AutoTokenizer's ``encode``; ``False``: without special tokens (for chat text)."""
        return list(self._tok.encode(text, add_special_tokens=bos).ids)

    def decode(self, ids: Sequence[int], prev: int | None = None) -> str:
        """Text without special tokens, as AutoTokenizer decodes it; ``prev`` is ignored."""
        try:
            return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)
        except Exception as e:
            raise TokenizerError(f"{self.source}: cannot decode {list(ids)[:8]}...: {e}") from e



def _pick_template(value: Any) -> str | None:
    """tokenizer_config's ``chat_template``: a string, or a list of named templates."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


def read_chat_template(path: str | os.PathLike[str]) -> str:
    """A Jinja chat template file (``--chat-template FILE``), checked to compile; one-line errors."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"chat template {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if not text.strip():
        raise TokenizerError(f"chat template {path} is empty")
    render_chat_template(text, [{"role": "user", "content": "hi"}])  # a syntax error shows now, not per request
    return text


def render_chat_template(template: str, messages: list[dict[str, str]], *, bos_token: str = "",
                         eos_token: str = "", add_generation_prompt: bool = True) -> str:
    """``messages`` as the prompt text ``template`` (Jinja, as in Hugging Face's tokenizer_config) makes."""
    return _render_chat(template, messages=messages, add_generation_prompt=add_generation_prompt,
                        bos_token=bos_token, eos_token=eos_token)


def _render_chat(template: str, **context: Any) -> str:
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise TokenizerError("chat templates need jinja2 (pip install jinja2)") from e

    def raise_exception(message: str) -> None:
        raise TokenizerError(f"chat template: {message}")

    def tojson(value: Any, indent: int | None = None) -> str:
        return json.dumps(value, ensure_ascii=False, indent=indent)

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(template).render(**context)
    except jinja2.TemplateError as e:
        raise TokenizerError(f"chat template failed to render: {e}") from e


# --------------------------------------------------------------------------- loading, streaming


def load_tokenizer(model_dir: str | os.PathLike[str], info: dict[str, Any]) -> Tokenizer:
    """The tokenizer a manifest's ``tokenizer`` entry describes."""
    kind = info.get("kind")
    try:
        if kind == "llama2c":
            return Llama2cTokenizer.from_file(Path(model_dir) / info["file"], int(info["vocab_size"]))
        if kind == "hf":
            return HFTokenizer.from_dir(model_dir, info.get("file", "tokenizer.json"), info.get("config"))
    except KeyError as e:
        raise TokenizerError(f"{model_dir}: tokenizer entry {info} lacks {e}") from e
    raise TokenizerError(f"{model_dir}: unknown tokenizer kind {kind!r} (expected 'llama2c' or 'hf')")


class StreamDecoder:
    """Incremental detokenisation: text appears once no later token can change it.

    Decodes a small window ``ids[prefix:]`` and emits what it adds over
    ``ids[prefix:read]``; text ending in U+FFFD (an incomplete UTF-8 sequence)
    is held back.  The window restarts after each emission, so the cost per
    token does not grow with the length of the generation.
    """

    def __init__(self, tokenizer: Tokenizer, prev: int | None = None) -> None:
        self._tok = tokenizer
        self._prev = prev  # id before ids[0]
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _text(self, start: int, end: int) -> str:
        prev = self._ids[start - 1] if start > 0 else self._prev
        return self._tok.decode(self._ids[start:end], prev=prev)

    def _advance(self) -> None:
        self._prefix, self._read = self._read, len(self._ids)
        drop = self._prefix - 1  # keep one id before the window as its `prev`
        if drop > 0:
            self._prev = self._ids[drop - 1]
            del self._ids[:drop]
            self._prefix -= drop
            self._read -= drop

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it made final (often ``""``)."""
        self._ids.append(int(token_id))
        before = self._text(self._prefix, self._read)
        after = self._text(self._prefix, len(self._ids))
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._advance()
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. a dangling partial character)."""
        before = self._text(self._prefix, self._read)
        after = self._text(self._prefix, len(self._ids))
        self._read = len(self._ids)
        self._advance()
        return after[len(before) :]
