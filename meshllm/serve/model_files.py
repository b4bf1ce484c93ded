"""A serving node's model directory: its manifest and tokenizer, verified stage files, and repair from peers.

:class:`ModelFiles` owns the directory and what this node knows about it:
which files it has verified, which it found corrupt (never served to peers),
and whether it can serve at all. A stage's files are fetched from a peer when
absent and fetched again when they fail verification; when no peer can give a
good copy the node gives up with one :class:`~meshllm.errors.ModelError`,
stops advertising ``has_files`` and advertises ``model_error`` instead, so the
planner leaves it out of plans. This module does not load graphs
(:class:`~meshllm.runtime.segment.Segment` does) and does not plan.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshllm.errors import ManifestError, MeshError, ModelError, NoModelSource
from meshllm.model.manifest import MANIFEST_NAME, Manifest, load_manifest, sha256_file, verify_files
from meshllm.model.tokenizer import Tokenizer, load_tokenizer
from meshllm.serve.fetch import fetch_file, missing_files, serve_fetch

log = logging.getLogger(__name__)

START_WAIT_S = 60.0  # a node with an empty model directory waits this long for a peer holding the model
DEPLOY_WAIT_S = 5.0  # at deploy the members are known: a short grace for a peer's record to arrive
WAIT_LOG_S = 10.0  # while waiting for a peer, say so this often


@dataclass(frozen=True)
class Source:
    """A peer that advertises the complete model (same manifest) and its data-plane address."""

    node_id: str
    host: str
    port: int


def sources(members: Iterable[tuple[str, dict[str, Any]]], me: str, model_sha: str | None) -> list[Source]:
    """Members other than ``me`` that hold every file of the model with manifest hash ``model_sha``
    (any model when ``model_sha`` is None: a node that has no manifest yet)."""
    return [Source(i, str(info["host"]), int(info["port"])) for i, info in members
            if i != me and info.get("has_files") and not info.get("model_error")
            and (model_sha is None or info.get("model_sha") == model_sha)]


class ModelFiles:
    """The model directory of one node. ``announce`` is awaited whenever :meth:`record` changes."""

    def __init__(self, model_dir: Path, node_id: str, key: bytes | None,
                 announce: Callable[[], Awaitable[None]]) -> None:
        if not model_dir.is_dir():
            raise ModelError(f"model directory {model_dir} does not exist: give --model a meshllm model "
                             "directory, or an existing empty directory to fetch the model from a peer")
        self.dir, self.node_id, self.key, self._announce = model_dir, node_id, key, announce
        self.manifest: Manifest | None = None
        self.tokenizer: Tokenizer | None = None
        self.model_sha: str | None = None
        self.verified: set[str] = set()
        self.corrupt: set[str] = set()  # found bad here: withheld from peers until fetched again
        self.error: str | None = None  # why this node cannot serve (sticky: it is out of plans)
        if (model_dir / MANIFEST_NAME).exists():
            self.load_meta()

    def load_meta(self) -> None:
        """Reads and checks the manifest, loads the tokenizer."""
        self.manifest = load_manifest(self.dir)
        self.tokenizer = load_tokenizer(self.dir, self.manifest.tokenizer)
        self.model_sha = sha256_file(self.dir / MANIFEST_NAME)

    def record(self) -> dict[str, Any]:
        """What this node advertises about its model in its member record."""
        if self.manifest is None:
            return {}
        complete = not self.corrupt and not missing_files(self.dir, self.manifest, list(self.manifest.files))
        out: dict[str, Any] = {"model_name": self.manifest.name, "context_length": self.manifest.config.max_seq_len,
                               "model_sha": self.model_sha, "has_files": complete and self.error is None}
        if self.tokenizer is not None:
            out["chat_template"] = self.tokenizer.chat_template_name  # named in /v1/models and `meshllm status`
        if self.error is not None:
            out["model_error"] = self.error
        return out

    async def serve(self, msg: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        await serve_fetch(self.dir, self.manifest, msg, writer, withheld=self.corrupt)

    # --- getting the files --------------------------------------------

    async def fetch_meta(self, peers: Callable[[str | None], list[Source]]) -> None:
        """A node that has no manifest yet learns the model from a peer: manifest, then tokenizer."""
        log.warning("%s: %s holds no model yet: waiting for a peer that holds the model to fetch it from",
                    self.node_id, self.dir)
        await self.fetch([MANIFEST_NAME], peers, START_WAIT_S)
        try:
            manifest = load_manifest(self.dir)
        except ManifestError:
            (self.dir / MANIFEST_NAME).unlink(missing_ok=True)  # a later start asks again, maybe another peer
            raise
        self.model_sha = sha256_file(self.dir / MANIFEST_NAME)  # the tokenizer from a peer of this very model
        await self.fetch(manifest.tokenizer_files(), peers, START_WAIT_S, manifest)
        self.load_meta()
        await self._announce()

    async def fetch(self, files: list[str], peers: Callable[[str | None], list[Source]], wait_s: float,
                    manifest: Manifest | None = None) -> None:
        """Fetches ``files`` from peers that hold the model, trying each in turn; a :class:`ModelError`
        when no peer turns up within ``wait_s`` or none can give a good copy."""
        manifest = manifest or self.manifest
        start = time.monotonic()
        said = start
        while not (found := peers(self.model_sha)):
            now = time.monotonic()
            if now - start > wait_s:
                raise NoModelSource(f"no peer holds the model files ({', '.join(files[:3])}"
                              f"{', ...' if len(files) > 3 else ''}) after {wait_s:g} s: start a node whose "
                              f"--model directory holds them, or copy the model into {self.dir}")
            if now - said >= WAIT_LOG_S:
                said = now
                log.warning("%s: still waiting for a peer that holds the model files (%.0f s of %g s)",
                            self.node_id, now - start, wait_s)
            await asyncio.sleep(0.5)
        for name in files:
            entry = manifest.files.get(name) if manifest is not None else None
            errors = []
            for peer in found:
                try:
                    await self._fetch_one(peer, name, entry.sha256 if entry else None, entry.size if entry else None)
                    break
                except ModelError as e:
                    errors.append(f"{peer.node_id}: {e}")
            else:
                raise ModelError(f"cannot fetch {name} from any peer ({'; '.join(errors)})")

    async def _fetch_one(self, peer: Source, name: str, sha256: str | None, size: int | None) -> None:
        for attempt in range(2):  # a cut transfer resumes from its .part file
            try:
                await fetch_file(peer.host, peer.port, self.dir, name, sha256=sha256, size=size, key=self.key)
                return
            except MeshError as e:  # refused, or a bad copy (discarded): this peer will not do better
                raise ModelError(str(e)) from None
            except (TimeoutError, OSError, EOFError) as e:
                if attempt == 1:
                    raise ModelError(f"{type(e).__name__}: {e}") from None
                log.warning("%s: fetching %s from %s failed (%s); retrying", self.node_id, name, peer.node_id, e)

    async def ensure(self, files: list[str], peers: Callable[[str | None], list[Source]], executor: Executor,
                     wait_s: float = DEPLOY_WAIT_S) -> None:
        """Makes ``files`` present and verified: fetches the absent ones, and fetches again (from a peer
        with a good copy) those that fail verification. A :class:`ModelError` when that cannot be done;
        the node then advertises the error (and no files) until it is restarted."""
        assert self.manifest is not None
        manifest = self.manifest
        try:
            absent = missing_files(self.dir, manifest, files)
            if absent:
                log.info("%s: fetching %d model files from a peer", self.node_id, len(absent))
                await self.fetch(absent, peers, wait_s)
                await self._announce()
            todo = [f for f in files if f not in self.verified]
            bad = await self._verify(todo, executor)
            if bad:
                first = next(iter(bad.values()))
                log.warning("%s: %d model file(s) fail verification (%s); fetching them again from a peer",
                            self.node_id, len(bad), first)
                self.corrupt.update(bad)
                await self._announce()  # has_files: false, so that no peer fetches them from here
                for name in bad:
                    (self.dir / name).unlink(missing_ok=True)
                try:
                    await self.fetch(list(bad), peers, wait_s)
                except ModelError as e:
                    why = "no member holds the model" if isinstance(e, NoModelSource) else str(e)
                    raise ModelError(f"{first}; no peer could give a good copy ({why}): put a good copy of the "
                                     f"model in {self.dir} and restart this node") from None
                still = await self._verify(list(bad), executor)
                if still:
                    raise ModelError(f"{next(iter(still.values()))}, even after fetching it again: put a good "
                                     f"copy of the model in {self.dir} and restart this node")
                self.corrupt.difference_update(bad)
                await self._announce()
                log.warning("%s: fetched %d corrupt model file(s) again; they verify now", self.node_id, len(bad))
            self.verified.update(todo)
        except ModelError as e:
            self.error = str(e)
            await self._announce()
            raise

    async def _verify(self, files: list[str], executor: Executor) -> dict[str, str]:
        """The files of ``files`` that fail verification, with why (hashing runs off the event loop)."""
        assert self.manifest is not None
        manifest = self.manifest

        def check() -> dict[str, str]:
            bad = {}
            for name in files:
                try:
                    verify_files(self.dir, manifest, [name])
                except ManifestError as e:
                    bad[name] = str(e)
            return bad
        return await asyncio.get_running_loop().run_in_executor(executor, check)
