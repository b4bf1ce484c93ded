"""A numpy transcription of Karpathy's llama2.c ``run.c``, used as the test oracle.

It deliberately shares no code with meshllm: it parses the checkpoint and
``tokenizer.bin`` itself and follows ``run.c`` statement by statement (float32
arithmetic, the same loop structure), vectorising only inner loops whose
element-wise arithmetic is unchanged.  If meshllm and this file agree, both
agree with ``run.c``.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence

import numpy as np

f32 = np.float32


class RunC:
    """``run.c``'s Transformer, Tokenizer and greedy ``generate`` on one checkpoint."""

    def __init__(self, checkpoint_path: str, tokenizer_path: str | None = None) -> None:
        self._read_checkpoint(str(checkpoint_path))
        self.vocab: list[bytes] = []
        self.vocab_scores: list[float] = []
        if tokenizer_path is not None:
            self._build_tokenizer(str(tokenizer_path), self.vocab_size)

    # ---------------------------------------------------------------- checkpoint

    def _read_checkpoint(self, path: str) -> None:
        header = np.fromfile(path, dtype="<i4", count=7)
        (self.dim, self.hidden_dim, self.n_layers, self.n_heads, self.n_kv_heads, vocab_size, self.seq_len) = (
            int(v) for v in header
        )
        shared_weights = vocab_size > 0
        self.vocab_size = abs(vocab_size)
        data = np.fromfile(path, dtype="<f4", offset=7 * 4)
        self._memory_map_weights(data, shared_weights)
        self.kv_dim = (self.dim * self.n_kv_heads) // self.n_heads
        self.key_cache = np.zeros((self.n_layers, self.seq_len, self.kv_dim), dtype=f32)
        self.value_cache = np.zeros((self.n_layers, self.seq_len, self.kv_dim), dtype=f32)

    def _memory_map_weights(self, data: np.ndarray, shared_weights: bool) -> None:
        dim, hidden, L, vocab = self.dim, self.hidden_dim, self.n_layers, self.vocab_size
        head_size = dim // self.n_heads
        ptr = 0

        def take(*shape: int) -> np.ndarray:
            nonlocal ptr
            n = int(np.prod(shape))
            out = data[ptr : ptr + n].reshape(shape)
            ptr += n
            return out

        self.token_embedding_table = take(vocab, dim)
        self.rms_att_weight = take(L, dim)
        self.wq = take(L, self.n_heads * head_size, dim)
        self.wk = take(L, self.n_kv_heads * head_size, dim)
        self.wv = take(L, self.n_kv_heads * head_size, dim)
        self.wo = take(L, dim, self.n_heads * head_size)
        self.rms_ffn_weight = take(L, dim)
        self.w1 = take(L, hidden, dim)
        self.w2 = take(L, dim, hidden)
        self.w3 = take(L, hidden, dim)
        self.rms_final_weight = take(dim)
        ptr += self.seq_len * head_size // 2  # skip what used to be freq_cis_real
        ptr += self.seq_len * head_size // 2  # skip what used to be freq_cis_imag
        self.wcls = self.token_embedding_table if shared_weights else take(vocab, dim)

    # ---------------------------------------------------------------- forward

    @staticmethod
    def rmsnorm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        ss = f32(np.dot(x, x))
        ss = ss / f32(x.size)
        ss = ss + f32(1e-5)
        ss = f32(1.0) / np.sqrt(ss)
        return weight * (ss * x)

    @staticmethod
    def softmax(x: np.ndarray) -> np.ndarray:
        max_val = x.max()
        e = np.exp(x - max_val)
        s = f32(e.sum())
        return e / s

    @staticmethod
    def matmul(w: np.ndarray, x: np.ndarray) -> np.ndarray:
        # W (d,n) @ x (n,) -> xout (d,)
        return w @ x

    def forward(self, token: int, pos: int) -> np.ndarray:
        dim, hidden_dim = self.dim, self.hidden_dim
        kv_dim = self.kv_dim
        kv_mul = self.n_heads // self.n_kv_heads
        head_size = dim // self.n_heads

        x = self.token_embedding_table[token].copy()

        for l in range(self.n_layers):  # noqa: E741
            xb = self.rmsnorm(x, self.rms_att_weight[l])

            q = self.matmul(self.wq[l], xb)
            k = self.matmul(self.wk[l], xb)
            v = self.matmul(self.wv[l], xb)

            # RoPE: for (i = 0; i < dim; i += 2), rotating k only while i < kv_dim
            i = np.arange(0, dim, 2)
            head_dim = (i % head_size).astype(f32)
            freq = f32(1.0) / np.power(f32(10000.0), head_dim / f32(head_size))
            val = f32(pos) * freq
            fcr, fci = np.cos(val), np.sin(val)
            q0, q1 = q[0::2].copy(), q[1::2].copy()
            q[0::2] = q0 * fcr - q1 * fci
            q[1::2] = q0 * fci + q1 * fcr
            nk = kv_dim // 2
            k0, k1 = k[0::2].copy(), k[1::2].copy()
            k[0::2] = k0 * fcr[:nk] - k1 * fci[:nk]
            k[1::2] = k0 * fci[:nk] + k1 * fcr[:nk]

            self.key_cache[l, pos] = k
            self.value_cache[l, pos] = v

            xb = np.zeros(dim, dtype=f32)
            for h in range(self.n_heads):
                qh = q[h * head_size : (h + 1) * head_size]
                kh = self.key_cache[l, : pos + 1, (h // kv_mul) * head_size : (h // kv_mul + 1) * head_size]
                att = (kh @ qh) / np.sqrt(f32(head_size))
                att = self.softmax(att)
                vh = self.value_cache[l, : pos + 1, (h // kv_mul) * head_size : (h // kv_mul + 1) * head_size]
                xb[h * head_size : (h + 1) * head_size] = att @ vh

            xb2 = self.matmul(self.wo[l], xb)
            x = x + xb2

            xb = self.rmsnorm(x, self.rms_ffn_weight[l])
            hb = self.matmul(self.w1[l], xb)
            hb2 = self.matmul(self.w3[l], xb)
            hb = hb * (f32(1.0) / (f32(1.0) + np.exp(-hb)))
            hb = hb * hb2
            xb = self.matmul(self.w2[l], hb)
            x = x + xb

        x = self.rmsnorm(x, self.rms_final_weight)
        return self.matmul(self.wcls, x).astype(f32)

    # ---------------------------------------------------------------- tokenizer

    def _build_tokenizer(self, path: str, vocab_size: int) -> None:
        with open(path, "rb") as f:
            (self.max_token_length,) = struct.unpack("<i", f.read(4))
            for _ in range(vocab_size):
                (score,) = struct.unpack("<f", f.read(4))
                (length,) = struct.unpack("<i", f.read(4))
                piece = f.read(length)
                self.vocab_scores.append(score)
                self.vocab.append(piece.split(b"\0", 1)[0])  # C strings end at NUL
        self.sorted_vocab: dict[bytes, int] = {}
        for i, piece in enumerate(self.vocab):
            self.sorted_vocab.setdefault(piece, i)

    def str_lookup(self, s: bytes) -> int:
        return self.sorted_vocab.get(s, -1)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        data = text.encode("utf-8", "surrogatepass").split(b"\0", 1)[0] + b"\0"  # a C string
        tokens: list[int] = []
        if bos:
            tokens.append(1)
        if data[0] != 0:
            dummy_prefix = self.str_lookup(b" ")
            if dummy_prefix == -1:
                raise ValueError("run.c would index vocab[-1]: no ' ' piece for the dummy prefix")
            tokens.append(dummy_prefix)

        str_buffer = bytearray()
        c = 0
        while data[c] != 0:
            if (data[c] & 0xC0) != 0x80:
                str_buffer = bytearray()
            str_buffer.append(data[c])
            if (data[c + 1] & 0xC0) == 0x80 and len(str_buffer) < 4:
                c += 1
                continue
            tid = self.str_lookup(bytes(str_buffer))
            if tid != -1:
                tokens.append(tid)
            else:
                for b in str_buffer:
                    tokens.append(b + 3)
            str_buffer = bytearray()
            c += 1

        while True:
            best_score = f32(-1e10)
            best_id = -1
            best_idx = -1
            for i in range(len(tokens) - 1):
                tid = self.str_lookup(self.vocab[tokens[i]] + self.vocab[tokens[i + 1]])
                if tid != -1 and f32(self.vocab_scores[tid]) > best_score:
                    best_score = f32(self.vocab_scores[tid])
                    best_id = tid
                    best_idx = i
            if best_idx == -1:
                break
            tokens[best_idx] = best_id
            del tokens[best_idx + 1]

        if eos:
            tokens.append(2)
        return tokens

    def decode(self, prev_token: int, token: int) -> bytes:
        """The C string ``run.c``'s ``decode()`` returns (a byte 0 piece is the empty string)."""
        piece = self.vocab[token]
        if prev_token == 1 and piece[:1] == b" ":
            piece = piece[1:]
        m = re.match(rb"<0x([0-9A-Fa-f]{1,2})", piece)  # sscanf(piece, "<0x%02hhX>", &byte_val) == 1
        if m:
            return bytes([int(m.group(1), 16)]).split(b"\0", 1)[0]
        return piece

    # ---------------------------------------------------------------- generate

    def generate_greedy(self, prompt: str | Sequence[int], steps: int) -> list[int]:
        """Token ids ``run.c`` prints after the prompt at temperature 0 (without the stopping BOS)."""
        if steps == 0 or steps > self.seq_len:
            steps = self.seq_len
        prompt_tokens = self.encode(prompt, True, False) if isinstance(prompt, str) else list(prompt)
        num_prompt_tokens = len(prompt_tokens)
        if num_prompt_tokens < 1:
            raise ValueError("something is wrong, expected at least 1 prompt token")
        generated: list[int] = []
        token = prompt_tokens[0]
        pos = 0
        while pos < steps:
            logits = self.forward(token, pos)
            sampled = pos >= num_prompt_tokens - 1
            if not sampled:
                next_token = prompt_tokens[pos + 1]  # force the prompt
            else:
                next_token = int(np.argmax(logits))  # temperature 0: first maximum
            pos += 1
            if next_token == 1:  # BOS delimits sequences
                break
            if sampled:
                generated.append(next_token)
            token = next_token
        return generated
