"""The condensed-document cache: beacon memory snapshots keyed by the exact token prefix.

Condensing a book takes a while; asking it a second question should not. After the engine has
read a window-aligned prefix of a prompt, it stores a snapshot of the whole beacon memory under
a digest of (model fingerprint, pinned beacon settings, prefix token ids). A later prompt that
starts with the same tokens restores the snapshot and reads only the rest. Because the prefix
ends on a window boundary and the ratio is pinned, the restored state is bit-identical to reading
the prefix again, so cached and uncached answers are token-for-token the same.

Two tiers: an in-memory LRU bounded in bytes, and an optional folder of safetensors files written
atomically with a checksum; a file that is corrupt or was written for other settings is deleted
and rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .beacon.memory import BeaconMemory

logger = logging.getLogger(__name__)
FORMAT_VERSION = 1


def prefix_digests(
    header: str, token_ids: list[int], step: int, limit: int
) -> list[tuple[int, str]]:
    """(length, digest) of every prefix `token_ids[:k*step]` with `k*step <= limit`, longest last."""
    hasher = hashlib.sha256(header.encode())
    out = []
    for end in range(step, limit + 1, step):
        hasher.update(
            torch.tensor(token_ids[end - step : end], dtype=torch.int64).numpy().tobytes()
        )
        out.append((end, hasher.copy().hexdigest()))
    return out


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    hasher = hashlib.sha256()
    for name in sorted(tensors):
        hasher.update(name.encode())
        tensor = tensors[name].detach().contiguous().cpu()
        hasher.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return hasher.hexdigest()


class CondensedCache:
    """Snapshots of condensed prefixes: an LRU in memory (bytes-bounded) and optionally on disk."""

    def __init__(
        self,
        max_bytes: int = 2 << 30,
        directory: str | os.PathLike | None = None,
        max_disk_bytes: int = 20 << 30,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_disk_bytes = max_disk_bytes
        self.directory = Path(directory).expanduser() if directory else None
        if self.directory:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._entries: OrderedDict[str, tuple[BeaconMemory, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    # ------------------------------------------------------------------ lookup
    def restore_longest(
        self,
        candidates: list[tuple[int, str]],
        memory: BeaconMemory,
        device: torch.device | None = None,
    ) -> int:
        """Restore the longest cached prefix among `candidates` into `memory`; its length or 0.

        `device` is where the model runs (snapshots read from disk are moved there).
        """
        for length, digest in reversed(candidates):
            if self._restore(digest, memory, device):
                self.hits += 1
                return length
        self.misses += 1
        return 0

    def _restore(self, digest: str, memory: BeaconMemory, device: torch.device | None) -> bool:
        with self._lock:
            entry = self._entries.get(digest)
            if entry is not None:
                self._entries.move_to_end(digest)
        if entry is not None:
            memory.restore(entry[0])
            return True
        if self.directory is None:
            return False
        path = self.directory / f"{digest}.safetensors"
        if not path.is_file():
            return False
        try:
            tensors, meta = self._read(path, digest)
            memory.import_state(tensors, meta, device=device)
        except Exception as error:  # corrupt, truncated, other settings: rebuild, never trust
            logger.warning("discarding cache file %s: %s", path.name, error)
            path.unlink(missing_ok=True)
            memory.reset()
            return False
        self._remember(digest, memory.snapshot(), memory.nbytes())
        return True

    # ------------------------------------------------------------------ store
    def store(self, digest: str, memory: BeaconMemory) -> None:
        """Keep a snapshot of `memory` (which has just read the prefix `digest` names)."""
        size = memory.nbytes()
        if size <= self.max_bytes:
            self._remember(digest, memory.snapshot(), size)
        if self.directory is not None:
            try:
                self._write(digest, memory)
            except OSError as error:
                logger.warning("could not write cache file for %s: %s", digest[:12], error)

    def _remember(self, digest: str, snapshot: BeaconMemory, size: int) -> None:
        if size > self.max_bytes:
            return
        with self._lock:
            if digest in self._entries:
                self._bytes -= self._entries.pop(digest)[1]
            self._entries[digest] = (snapshot, size)
            self._bytes += size
            while self._bytes > self.max_bytes and self._entries:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted

    # ------------------------------------------------------------------ disk format
    def _write(self, digest: str, memory: BeaconMemory) -> None:
        tensors, meta = memory.export_state()
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        header = {
            "format": str(FORMAT_VERSION),
            "digest": digest,
            "checksum": _checksum(tensors),
            "meta": json.dumps(meta),
        }
        handle, temporary = tempfile.mkstemp(dir=self.directory, suffix=".partial")
        os.close(handle)
        try:
            save_file(tensors, temporary, metadata=header)
            os.replace(temporary, self.directory / f"{digest}.safetensors")
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
        self._trim_disk()

    def _read(self, path: Path, digest: str) -> tuple[dict[str, torch.Tensor], dict]:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        if header.get("format") != str(FORMAT_VERSION) or header.get("digest") != digest:
            raise ValueError("written by another version or for another prefix")
        if header.get("checksum") != _checksum(tensors):
            raise ValueError("checksum mismatch")
        return tensors, json.loads(header["meta"])

    def _trim_disk(self) -> None:
        files = sorted(self.directory.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        while files and total > self.max_disk_bytes:
            oldest = files.pop(0)
            total -= oldest.stat().st_size
            oldest.unlink(missing_ok=True)
