"""A segment: layers [start, stop) of a model in one onnxruntime session, with its KV caches.

The segment is the unit a node runs. At load, the per-layer graphs of the
model directory are concatenated into one graph (one session per segment: one
thread pool, one ``run`` per step), with the head when ``stop == n_layers``.
The first segment (``start == 0``) looks up its tokens' embedding rows itself, reading
them from the model file per step (:mod:`meshllm.runtime.embedding`), so no copy of
the table is held; an embedding graph of another form stays in the session.

KV caches live here, per layer, as preallocated arrays of shape
``(max_batch, kv_heads, max_seq_len, head_dim)``, float32 or float16 (the
model's ``kv_dtype`` or the node's choice; the graph is retyped to match at
load, see :func:`meshllm.runtime.onnx_wire.with_float16_kv`); each sequence owns one batch
row ("slot"). The caches are anonymous mappings in small pages, resident where written; closing a sequence
and moving rows give back the pages beyond each row's own length, so the memory a segment uses follows the
tokens its sequences hold (a paged KV cache, the OS's pages as its pages), not ``max_batch`` rows at full
length or a row's high-water mark. ``past_*`` and ``present_*`` are bound to the same memory, so
onnxruntime's GroupQueryAttention appends the new keys and values in place and
never copies the cache. A batched decode step needs its sequences in
consecutive slots; :meth:`Segment.decode` moves rows when the batch changes
(a copy of one sequence's cache, not one per step). The prompts of new sequences
can run together too (:meth:`Segment.prefill_many`: rows padded to the longest).

This module runs graphs; it knows nothing of tokens, sampling or the network. It does not import
``onnx``: part graphs are merged at the protobuf wire level (:mod:`meshllm.runtime.onnx_wire`).
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from meshllm.errors import ContextLengthError, GenerationError, ManifestError, ModelError
from meshllm.model import interface
from meshllm.model.manifest import Manifest, load_manifest, verify_files
from meshllm.runtime import onnx_wire, residency
from meshllm.runtime.embedding import EmbeddingRows, runtime_embedding

log = logging.getLogger(__name__)

SeqId = Hashable

#: A longer prompt is prefilled in chunks of this many tokens: the activations of a step grow with its
#: tokens (and onnxruntime's arena keeps its peak), so 512 tokens at once held ~50 MB more than 4 x 128
#: on the 110M shape, at the same speed, and 8 x 64 ~10 MB less than 4 x 128 (5 % of an int4 process)
#: for a prefill 2-5 % slower (docs/inference.md).
PREFILL_CHUNK = 64


def kv_array(shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, mmap.mmap]:
    """A zeroed, C-contiguous, page-aligned array on an anonymous private mapping of its own, and the
    mapping (to give pages back with :func:`give_back`). ``np.zeros`` would ask for huge pages (numpy advises
    them from 4 MB), which make 2 MB resident for a row's first token and cannot be given back by the row."""
    size = int(np.prod(shape)) * dtype.itemsize
    mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        mem.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(mem, dtype).reshape(shape), mem


def give_back(mem: mmap.mmap, start: int, stop: int) -> None:
    """Returns the whole pages within bytes ``[start, stop)`` of ``mem`` to the OS (``MADV_DONTNEED``: they
    read zeros after on Linux); a page partly outside the range stays."""
    start = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    stop = stop // mmap.PAGESIZE * mmap.PAGESIZE
    if stop > start and hasattr(mmap, "MADV_DONTNEED"):
        mem.madvise(mmap.MADV_DONTNEED, start, stop - start)


def session_options(threads: int | None = None, spinning: bool = True) -> ort.SessionOptions:
    """``spinning=False`` makes idle worker threads sleep at once instead of spin-waiting: right when
    several processes share the cores (pipeline stages on one machine), where a stage that has just
    finished would otherwise burn the cores the next stage needs."""
    so = ort.SessionOptions()
    if not spinning:  # spin while a run lasts, sleep as soon as it ends
        so.add_session_config_entry("session.force_spinning_stop", "1")
    so.intra_op_num_threads = threads or os.cpu_count() or 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


def merge_parts(model_dir: Path, files: Sequence[str], name: str) -> bytes:
    """Concatenates part graphs (a serialized ``ModelProto``); tensors flow by their interface names
    (``hidden.<i>`` ...)."""
    protos = []
    for f in files:
        try:
            protos.append((model_dir / f).read_bytes())
            onnx_wire.parse(protos[-1])
        except (OSError, ModelError) as e:
            raise ModelError(f"{model_dir / f}: not a readable ONNX graph ({e})") from None
    try:
        return onnx_wire.merge(protos, name)
    except ModelError as e:
        raise ModelError(f"{model_dir}: cannot merge the graphs of {', '.join(files)} ({e})") from None


class Segment:
    """Layers ``[start, stop)`` of the model in ``model_dir``, ready to run steps."""

    def __init__(
        self,
        model_dir: str | Path,
        start: int = 0,
        stop: int | None = None,
        *,
        max_batch: int = 1,
        max_seq_len: int | None = None,
        threads: int | None = None,
        verify: bool = True,
        manifest: Manifest | None = None,
        spinning: bool = True,
        kv_dtype: str | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
    ) -> None:
        if prefill_chunk < 1:
            raise GenerationError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.model_dir = Path(model_dir)
        self.manifest = manifest or load_manifest(self.model_dir)
        cfg = self.config = self.manifest.config
        self.start, self.stop = start, cfg.n_layers if stop is None else stop
        parts = self.manifest.segment_parts(self.start, self.stop)
        files = [f for p in parts for f in p.files]
        if verify:
            verify_files(self.model_dir, self.manifest, files)
        else:
            missing = [f for f in files if not (self.model_dir / f).is_file()]
            if missing:
                raise ManifestError(f"{self.model_dir}: missing model files {missing}")
        self.has_embed = self.start == 0
        self.has_head = self.stop == cfg.n_layers
        self.max_batch = max_batch
        self.max_seq_len = min(max_seq_len or cfg.max_seq_len, cfg.max_seq_len)
        graph_files = [p.files[0] for p in parts]
        self.kv_dtype_name = kv_dtype or cfg.kv_dtype
        if self.kv_dtype_name not in interface.KV_DTYPES:
            raise ModelError(f"KV dtype {self.kv_dtype_name!r} is not one of {sorted(interface.KV_DTYPES)}")
        self.kv_dtype = np.dtype(interface.KV_DTYPES[self.kv_dtype_name])
        # the first segment looks its tokens' embedding rows up itself (never holding the table) where it can
        self._embed: EmbeddingRows | None = None
        if self.has_embed:
            self._embed = runtime_embedding(self.model_dir, graph_files[0], cfg.dim)
            if self._embed is not None:
                graph_files = graph_files[1:]
                if self._embed.layout.rows != cfg.vocab_size:
                    raise ModelError(f"{self.model_dir}: the embedding table has {self._embed.layout.rows} rows "
                                     f"but the config's vocab_size is {cfg.vocab_size}")
        model = merge_parts(self.model_dir, graph_files, f"segment_{self.start}_{self.stop}")
        if self.kv_dtype_name == "fp16":
            model = onnx_wire.with_float16_kv(model)
        model = onnx_wire.with_row_last(model)
        so = session_options(threads, spinning)
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.model_dir))
        try:
            self.session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own, unrelated error types
            raise ModelError(f"{self.model_dir}: cannot load layers [{self.start}, {self.stop}): {e}") from None
        # the packed weights are resident now (the KV caches below are not yet): a quantized model's onto
        # 2 MiB pages, which makes its steps' weight streaming faster; and the file pages onnxruntime keeps
        # mapped but does not read (the quantized weights' scales) out of the process (meshllm.runtime.residency)
        if self.manifest.quantization is not None:
            residency.collapse_resident_memory()
        residency.release_file_pages(self.model_dir / f for f in files)
        self.input_name = (interface.HIDDEN if self._embed is not None else interface.INPUT_IDS) if self.has_embed \
            else interface.hidden_out(self.start - 1)
        self.output_name = interface.LOGITS if self.has_head else interface.hidden_out(self.stop - 1)
        shape = (max_batch, cfg.n_kv_heads, self.max_seq_len, cfg.head_dim)
        caches = [kv_array(shape, self.kv_dtype) for _ in range(2 * (self.stop - self.start))]
        self._k = [a for a, _ in caches[0::2]]
        self._v = [a for a, _ in caches[1::2]]
        self._maps = [m for _, m in caches]  # the mappings of the arrays, to give their pages back
        self._row_bytes = int(np.prod(shape[1:])) * self.kv_dtype.itemsize
        self._owner: list[SeqId | None] = [None] * max_batch
        self._slot: dict[SeqId, int] = {}
        self._len = np.zeros(max_batch, np.int64)
        self._io = self.session.io_binding()
        self._bound: tuple[int, int] | None = None  # (first slot, batch) of the decode binding in place
        self._seqlens = np.zeros(max_batch, np.int32)
        self._total = np.zeros((), np.int32)
        self._out = np.zeros((max_batch, cfg.vocab_size if self.has_head else cfg.dim), np.float32)

    # --- sequences ----------------------------------------------------

    def open(self, seq: SeqId) -> None:
        """Reserves a cache slot for a new sequence."""
        if seq in self._slot:
            raise GenerationError(f"sequence {seq!r} is already open in this segment")
        try:
            slot = self._owner.index(None)
        except ValueError:
            raise GenerationError(f"segment is full: {self.max_batch} sequences already open") from None
        self._owner[slot] = seq
        self._slot[seq] = slot
        self._len[slot] = 0

    def close(self, seq: SeqId) -> None:
        """Frees ``seq``'s slot and gives its pages back: the slot's next sequence may be far shorter."""
        slot = self._slot.pop(seq, None)
        if slot is not None:
            self._owner[slot] = None
            self._len[slot] = 0
            self._give_back(slot, 0)

    def length(self, seq: SeqId) -> int:
        """Tokens cached for ``seq``."""
        return int(self._len[self._slot_of(seq)])

    @property
    def open_sequences(self) -> list[SeqId]:
        return list(self._slot)

    def _slot_of(self, seq: SeqId) -> int:
        try:
            return self._slot[seq]
        except KeyError:
            raise GenerationError(f"sequence {seq!r} is not open in this segment") from None

    def _swap(self, a: int, b: int) -> None:
        """Swaps the sequences of slots ``a`` and ``b``; each row keeps only the pages its new sequence needs."""
        la, lb = int(self._len[a]), int(self._len[b])
        for cache in (*self._k, *self._v):
            tmp = cache[a, :, :la].copy()
            cache[a, :, :lb] = cache[b, :, :lb]
            cache[b, :, :la] = tmp
        oa, ob = self._owner[a], self._owner[b]
        self._owner[a], self._owner[b] = ob, oa
        if oa is not None:
            self._slot[oa] = b
        if ob is not None:
            self._slot[ob] = a
        self._len[[a, b]] = self._len[[b, a]]
        self._give_back(a, lb)
        self._give_back(b, la)

    def _give_back(self, slot: int, keep: int) -> None:
        """Gives the pages of ``slot``'s rows beyond their first ``keep`` positions back to the OS, per head
        (whole pages only: a page shared with the next head stays)."""
        heads, seq_len, head_dim = self._k[0].shape[1:]
        if keep >= seq_len:
            return
        token = head_dim * self.kv_dtype.itemsize
        row = slot * self._row_bytes
        spans = [(row, row + self._row_bytes)] if keep == 0 else \
            [(row + (h * seq_len + keep) * token, row + (h + 1) * seq_len * token) for h in range(heads)]
        for mem in self._maps:
            for start, stop in spans:
                give_back(mem, start, stop)

    def _arrange(self, seqs: Sequence[SeqId]) -> int:
        """Puts ``seqs`` in consecutive slots, in order; returns the first slot."""
        slots = [self._slot_of(s) for s in seqs]
        lo = slots[0]
        if slots == list(range(lo, lo + len(slots))):
            return lo
        for j, s in enumerate(seqs):
            if self._slot[s] != j:
                self._swap(self._slot[s], j)
        return 0

    # --- KV hand-off -------------------------------------------------

    @property
    def layers(self) -> range:
        return range(self.start, self.stop)

    def export_kv(self, seq: SeqId, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Views of one layer's cached keys and values for ``seq``: ``(kv_heads, n, head_dim)`` each, in the
        cache's dtype (so a float16 cache hands off half the bytes)."""
        slot, n, j = self._slot_of(seq), self.length(seq), self._layer_index(layer)
        return self._k[j][slot, :, :n], self._v[j][slot, :, :n]

    def import_kv(self, seq: SeqId, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """Writes one layer's keys and values for ``seq`` (from another replica's prefill).

        The sequence's length becomes ``n`` once every layer of the segment has been written; the
        caller imports all layers before the next step."""
        slot, j = self._slot_of(seq), self._layer_index(layer)
        if k.dtype != self.kv_dtype or v.dtype != self.kv_dtype:
            raise GenerationError(
                f"KV block for layer {layer} is {k.dtype}/{v.dtype} but this segment's KV cache is {self.kv_dtype} "
                f"(--kv-dtype {self.kv_dtype_name}): prefill and decode replicas must use one KV dtype")
        expect = (self.config.n_kv_heads, k.shape[1] if k.ndim == 3 else -1, self.config.head_dim)
        if k.shape != expect or v.shape != expect or k.shape[1] > self.max_seq_len:
            raise GenerationError(f"KV block for layer {layer} has shape {k.shape}/{v.shape}, expected {expect}")
        n = k.shape[1]
        self._k[j][slot, :, :n] = k
        self._v[j][slot, :, :n] = v
        self._len[slot] = n

    def _layer_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise GenerationError(f"layer {layer} is not in this segment [{self.start}, {self.stop})")
        return layer - self.start

    # --- steps --------------------------------------------------------

    def prefill(self, seq: SeqId, x: np.ndarray) -> np.ndarray:
        """Appends a chunk of tokens (ids ``(S,)`` or hidden ``(1, S, D)``) to one sequence."""
        x = self._input(x, 1, None)
        n = x.shape[1]
        if n == 0:
            raise GenerationError("empty prompt chunk")
        c = self.prefill_chunk
        if n <= c:
            return self._run([seq], x, n)
        slot = self._slot_of(seq)
        before = int(self._len[slot])
        if before + n > self.max_seq_len:
            raise ContextLengthError(
                f"context length exceeded: {before + n} tokens > {self.max_seq_len} (the model's context)")
        outs = []
        try:
            for i in range(0, n, c):
                part = x[:, i:i + c]
                outs.append(self._run([seq], part, part.shape[1]))
        except Exception:
            self._len[self._slot_of(seq)] = before  # a failed prompt leaves the sequence as it was
            raise
        if self.has_head:  # logits of the last position
            return outs[-1]
        return np.concatenate([o.reshape(1, -1, self.config.dim) for o in outs], axis=1)

    @property
    def prefills_together(self) -> bool:
        """Whether :meth:`prefill_many` takes several prompts: with RoPE inside GroupQueryAttention, which
        places a padded row's tokens from 0; the graph's own RoPE (other head sizes) places them from its
        ``seqlens_k``, which padding shifts."""
        return interface.fused_rotary(self.config)

    def prefill_many(self, seqs: Sequence[SeqId], xs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Whole prompts of several new sequences in one step: ``xs[i]`` (as :meth:`prefill` takes it, at most
        ``prefill_chunk`` tokens) for ``seqs[i]``, which has nothing cached. Returns what :meth:`prefill` would
        return for each, the same numbers: each row only ever attends to its own tokens.

        One step instead of one per prompt is what keeps a burst of prompts from holding a pipeline for a
        round trip each. Rows are padded on the right to the longest; with no past, GroupQueryAttention takes
        each row's true length from ``seqlens_k`` (its first-prompt mode: padding is never attended to) and the
        head reads each row's last true position (:func:`meshllm.runtime.onnx_wire.with_row_last`). A sequence with
        tokens cached cannot join (the operator runs several rows of several tokens only with no past)."""
        if len(seqs) != len(xs) or not seqs:
            raise GenerationError(f"{len(xs)} prompts for {len(seqs)} sequences")
        if len(seqs) > 1 and not self.prefills_together:
            raise GenerationError(f"this model (head size {self.config.head_dim}) prefills one prompt at a time")
        if len(set(seqs)) != len(seqs):
            raise GenerationError("a sequence can only be prefilled once in a step")
        if len(seqs) > self.max_batch:
            raise GenerationError(f"{len(seqs)} prompts at once, but this segment holds {self.max_batch} sequences")
        rows = [self._input(x, 1, None) for x in xs]
        lens = np.array([r.shape[1] for r in rows], np.int64)
        for seq, n in zip(seqs, lens, strict=True):
            if n == 0:
                raise GenerationError("empty prompt chunk")
            if self.length(seq):
                raise GenerationError(f"sequence {seq!r} has tokens cached: only new sequences prefill together")
            if n > min(self.prefill_chunk, self.max_seq_len):
                raise GenerationError(f"a prompt of {n} tokens is prefilled alone (more than one chunk of "
                                      f"{self.prefill_chunk} or the context of {self.max_seq_len})")
        width = int(lens.max())
        x = np.zeros((len(rows), width, *rows[0].shape[2:]), rows[0].dtype)
        for i, r in enumerate(rows):
            x[i, :r.shape[1]] = r[0]
        lo = self._arrange(seqs)
        out = self._execute(lo, x, lens, False)
        for i, n in enumerate(lens):  # the padding the operator wrote past a shorter prompt: its pages go back
            if n < width:
                self._give_back(lo + i, int(n))
        if self.has_head:  # (B, V): each row's last true position
            return [out[i:i + 1].copy() for i in range(len(rows))]
        return [np.ascontiguousarray(out[i:i + 1, :n]) for i, n in enumerate(lens)]

    def decode(self, seqs: Sequence[SeqId], x: np.ndarray) -> np.ndarray:
        """One new token for each of ``seqs`` (ids ``(B,)`` or hidden ``(B, 1, D)``)."""
        return self._run(list(seqs), self._input(x, len(seqs), 1), 1)

    def _input(self, x: np.ndarray, rows: int, n: int | None) -> np.ndarray:
        """A step's input, checked (it may come from the network): token ids in ``[0, vocab)`` shaped
        ``(rows, n)`` for the first segment, float32 hidden states ``(rows, n, dim)`` for the others."""
        x = np.asarray(x)
        if self.has_embed:
            if x.size and x.dtype.kind not in "iu":
                raise GenerationError(f"token ids must be integers, got {x.dtype}")
            ids = x.astype(np.int64, copy=False)
            if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
                raise GenerationError(f"token ids must be in [0, {self.config.vocab_size}), got "
                                      f"{int(ids.min())}..{int(ids.max())}")
            if ids.size != rows * (n if n is not None else ids.size // max(rows, 1)):
                raise GenerationError(f"{ids.size} token ids do not make {rows} row(s)")
            return ids.reshape(rows, -1)
        want = (rows, n if n is not None else -1, self.config.dim)
        if (x.dtype != np.float32 or x.ndim != 3 or x.shape[0] != rows or x.shape[2] != want[2]
                or (n is not None and x.shape[1] != n)):
            raise GenerationError(f"hidden states must be float32 of shape {want}, got {x.dtype} {x.shape}")
        return x

    def _run(self, seqs: list[SeqId], x: np.ndarray, n_new: int) -> np.ndarray:
        if n_new > 1 and len(seqs) != 1:
            raise GenerationError("a chunk of several tokens can only be run for one sequence at a time")
        if x.shape[0] != len(seqs):
            raise GenerationError(f"input has batch {x.shape[0]} for {len(seqs)} sequences")
        lo = self._arrange(seqs)
        b = len(seqs)
        total = self._len[lo:lo + b] + n_new
        if int(total.max()) > self.max_seq_len:
            raise ContextLengthError(
                f"context length exceeded: {int(total.max())} tokens > {self.max_seq_len} (the model's context)"
            )
        return self._execute(lo, x, total, n_new == 1)

    def _execute(self, lo: int, x: np.ndarray, total: np.ndarray, decode: bool) -> np.ndarray:
        """Runs one step for slots ``[lo, lo + len(total))``, which hold ``total`` tokens each after it."""
        io = self._io
        b = len(total)
        if not decode or self._bound != (lo, b):
            self._bind(lo, b, decode)
        self._seqlens[:b] = total - 1
        self._total[...] = total.max()
        if self._embed is not None:
            x = self._embed(x)
        io.bind_cpu_input(self.input_name, np.ascontiguousarray(x))
        try:
            self.session.run_with_iobinding(io)
        except Exception as e:  # onnxruntime raises its own, unrelated error types
            self._bound = None
            raise GenerationError(f"layers [{self.start}, {self.stop}) failed: {e}") from None
        self._len[lo:lo + b] = total
        if decode:  # a copy: the bound buffer is the next step's output
            return self._out[:b].reshape(self._out_shape(b, 1)).copy()
        out: np.ndarray = io.get_outputs()[0].numpy()
        return out

    def _out_shape(self, b: int, n: int) -> tuple[int, ...]:
        return (b, self.config.vocab_size) if self.has_head else (b, n, self.config.dim)

    def _bind(self, lo: int, b: int, decode: bool) -> None:
        """Binds the caches of slots ``[lo, lo + b)``, the step's scalars and its output.

        A decode step keeps this binding while its slots stay the same (the common case: the same
        sequences step after step), so a step costs one ``bind`` for its input instead of two per
        cache and layer (~0.7 ms a step for 12 layers, 13 % of an int4 110M step)."""
        io = self._io
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        io.bind_input(interface.SEQLENS_K, "cpu", 0, np.int32, [b], self._seqlens.ctypes.data)
        io.bind_input(interface.TOTAL_SEQ_LEN, "cpu", 0, np.int32, [], self._total.ctypes.data)
        if decode:
            io.bind_output(self.output_name, "cpu", 0, np.float32, list(self._out_shape(b, 1)), self._out.ctypes.data)
        else:
            io.bind_output(self.output_name, "cpu")
        shape = [b, *self._k[0].shape[1:]]
        offset = lo * self._row_bytes
        for j, layer in enumerate(range(self.start, self.stop)):
            for cache, past, present in (
                (self._k[j], interface.past_key(layer), interface.present_key(layer)),
                (self._v[j], interface.past_value(layer), interface.present_value(layer)),
            ):
                ptr = cache.ctypes.data + offset
                io.bind_input(past, "cpu", 0, self.kv_dtype, shape, ptr)
                io.bind_output(present, "cpu", 0, self.kv_dtype, shape, ptr)
        self._bound = (lo, b) if decode else None
