"""The adaptation node's on-disk frame store: small crops + cached features + labels, crash-safe.

Layout: ``<root>/f_<stamp_ns:020d>.npz``, one file per entry, keyed by the frame's header stamp (ns).
Each file is an uncompressed npz (no pickle) written with :func:`~edge_tl_ros.atomic.atomic_write_bytes`
(unique temp file + fsync + rename), so a reader -- this process after a crash, or a second process --
only ever sees complete entries. An entry holds four arrays (few arrays = fast scans):

    meta        uint8 [J]    UTF-8 JSON: stamp (the frame's header stamp in ns, the key labels refer to),
                             created (wall-clock write time, for age eviction), label (class name,
                             '' = unlabelled), source ('' | 'topic' | 'teacher' | 'self'), top, conf
    features    float32 [D]  the student backbone's features of the frame
    probs       float32 [C]  the student's class probabilities
    crop        uint8 [K]    PNG bytes of a small RGB crop (cv2.imencode)

Bounds (count, bytes, age) hold at all times: room is made (oldest ``created`` first) *before* a new
file is written. A write that fails with OSError (ENOSPC, EFBIG, EDQUOT, EIO) drops that entry, is
counted in :attr:`FrameStore.dropped`, and leaves nothing behind. At start-up every entry is validated;
truncated or corrupt ones are removed and counted in :attr:`FrameStore.corrupt_removed`, and stale
temp files of crashed writers are deleted. Nothing in the store is ever published.
"""

from __future__ import annotations

import errno
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .atomic import atomic_write_bytes, npz_bytes

LABEL_SOURCES = ('topic', 'teacher', 'self')
# a label from a more trusted source is never overwritten by a less trusted one
SOURCE_RANK = {'': 0, 'self': 1, 'teacher': 2, 'topic': 3}
_NAME = re.compile(r'^f_(\d{1,20})\.npz$')
_REQUIRED = ('meta', 'features', 'probs', 'crop')
_META_KEYS = ('stamp', 'created', 'label', 'source', 'top', 'conf')
STALE_TMP_S = 60.0  # temp files older than this at start-up belong to a crashed writer


@dataclass
class _Meta:
    path: Path
    size: int
    created: float
    label: str | None  # None: not read yet (read-only stores scan names only)
    source: str | None


@dataclass
class StoreArrays:
    """Entries as arrays for training/evaluation; ``labels[i]`` is None for unlabelled entries."""

    stamps: np.ndarray  # [N] int64 (ns)
    features: np.ndarray  # [N, D] float32
    probs: list  # N arrays [C_i] float32 (C can change when the head gains classes)
    top: np.ndarray  # [N] int64
    conf: np.ndarray  # [N] float32
    labels: list  # N x (str | None)
    sources: list  # N x str ('' when unlabelled)
    created: np.ndarray  # [N] float64

    def __len__(self) -> int:
        return len(self.stamps)


def stamp_to_ns(sec: int, nanosec: int) -> int:
    return int(sec) * 1_000_000_000 + int(nanosec)


class FrameStore:
    """A bounded, crash-safe store of frames for on-robot adaptation (thread-safe within a process).

    ``max_age_s <= 0`` disables age eviction. ``crop_size`` is the (height, width) crops are stored at.
    ``readonly=True`` opens an existing store for reading only (a round's worker process): nothing is
    deleted, evicted or written, and the start-up scan only lists files (corrupt entries are skipped
    when :meth:`entries` reads them).
    A second process may write into the same directory (unique temp names, atomic renames); this
    instance sees its entries after :meth:`rescan`, and the caps apply to the entries it knows.
    """

    def __init__(self, root: str | os.PathLike, max_entries: int = 2000, max_bytes: int = 64 << 20,
                 max_age_s: float = 0.0, crop_size: tuple[int, int] = (32, 32), readonly: bool = False):
        self.root = Path(root).expanduser()
        self.readonly = readonly
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self._lock = threading.RLock()
        self._index: dict[int, _Meta] = {}
        self.dropped = 0  # entries not written (disk full, too large, I/O errors)
        self.dropped_by_errno: dict[str, int] = {}
        self.corrupt_removed = 0
        self.evicted = 0
        self.label_errors = 0  # label rewrites that failed (the entry keeps its previous label)
        self.last_error: str | None = None
        self.set_caps(max_entries, max_bytes, max_age_s)
        if not readonly:
            self.root.mkdir(parents=True, exist_ok=True)
        self.rescan()

    # -- configuration ---------------------------------------------------------------------------------
    def set_caps(self, max_entries: int | None = None, max_bytes: int | None = None,
                 max_age_s: float | None = None) -> None:
        """Change the bounds (evicts immediately so they hold)."""
        with self._lock:
            if max_entries is not None:
                if int(max_entries) < 1:
                    raise ValueError('max_entries must be >= 1')
                self.max_entries = int(max_entries)
            if max_bytes is not None:
                if int(max_bytes) < 1:
                    raise ValueError('max_bytes must be >= 1')
                self.max_bytes = int(max_bytes)
            if max_age_s is not None:
                self.max_age_s = float(max_age_s)
            if self._index and not self.readonly:
                self._make_room(0, 0)

    # -- start-up / rescan -----------------------------------------------------------------------------
    def rescan(self) -> None:
        """(Re)build the index from disk: validate every entry, drop corrupt ones, evict to the caps."""
        with self._lock:
            index: dict[int, _Meta] = {}
            if self.root.is_dir():
                now = time.time()
                for p in self.root.iterdir():
                    name = p.name
                    if name.startswith('.') and name.endswith('.tmp'):
                        if not self.readonly:
                            try:
                                if now - p.stat().st_mtime > STALE_TMP_S:
                                    p.unlink()
                            except OSError:
                                pass
                        continue
                    m = _NAME.match(name)
                    if not m:
                        continue
                    if self.readonly:  # a round's worker: entries() validates what it reads
                        try:
                            index[int(m.group(1))] = _Meta(p, p.stat().st_size, 0.0, None, None)
                        except OSError:
                            pass
                        continue
                    meta = self._read_meta(p, int(m.group(1)))
                    if meta is None:
                        self.corrupt_removed += 1
                        if not self.readonly:
                            try:
                                p.unlink()
                            except OSError:
                                pass
                        continue
                    index[int(m.group(1))] = meta
            self._index = index
            if not self.readonly:
                self._make_room(0, 0)

    @staticmethod
    def _read_meta(path: Path, stamp: int) -> _Meta | None:
        z = _read(path, ('meta',))
        if z is None or z['meta']['stamp'] != stamp:
            return None
        m = z['meta']
        try:
            return _Meta(path, path.stat().st_size, float(m['created']), str(m['label']), str(m['source']))
        except OSError:
            return None

    # -- bounds ----------------------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(m.size for m in self._index.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def __contains__(self, stamp: int) -> bool:
        with self._lock:
            return int(stamp) in self._index

    def _remove(self, stamp: int) -> None:
        meta = self._index.pop(stamp, None)
        if meta is not None:
            try:
                meta.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                self.last_error = f'cannot remove {meta.path.name}: {e}'

    def _make_room(self, add_count: int, add_bytes: int, now: float | None = None) -> None:
        """Evict (oldest first) until the caps hold with ``add_count``/``add_bytes`` more."""
        now = time.time() if now is None else now
        order = sorted(self._index, key=lambda s: (self._index[s].created, s))
        if self.max_age_s > 0:
            for s in order:
                if now - self._index[s].created > self.max_age_s:
                    self._remove(s)
                    self.evicted += 1
            order = [s for s in order if s in self._index]
        total = sum(m.size for m in self._index.values())
        for s in order:
            if len(self._index) + add_count <= self.max_entries and total + add_bytes <= self.max_bytes:
                break
            total -= self._index[s].size
            self._remove(s)
            self.evicted += 1

    def evict_expired(self) -> None:
        if self.readonly:
            return
        with self._lock:
            self._make_room(0, 0)

    # -- writing ---------------------------------------------------------------------------------------
    def encode_crop(self, image_rgb: np.ndarray) -> np.ndarray:
        """Resize an RGB image to ``crop_size`` and PNG-encode it (returns the bytes as uint8 array)."""
        h, w = self.crop_size
        img = image_rgb
        if img.shape[:2] != (h, w):
            interp = cv2.INTER_AREA if img.shape[0] > h or img.shape[1] > w else cv2.INTER_LINEAR
            img = cv2.resize(np.ascontiguousarray(img), (w, h), interpolation=interp)
        ok, enc = cv2.imencode('.png', cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2BGR))
        if not ok:
            raise ValueError('OpenCV failed to PNG-encode the crop')
        return enc.reshape(-1)

    def add(self, stamp_ns: int, image_rgb: np.ndarray, features: np.ndarray, probs: np.ndarray,
            label: str | None = None, source: str = '', created: float | None = None) -> bool:
        """Store one frame (replacing an entry with the same stamp). Returns False if it was dropped."""
        if self.readonly:
            raise PermissionError('store opened read-only')
        stamp_ns = int(stamp_ns)
        if label and source not in LABEL_SOURCES:
            raise ValueError(f'label source must be one of {LABEL_SOURCES}, got {source!r}')
        probs = np.asarray(probs, np.float32).reshape(-1)
        created = time.time() if created is None else float(created)
        top = int(np.argmax(probs)) if probs.size else -1
        meta = {'stamp': stamp_ns, 'created': created, 'label': label or '',
                'source': source if label else '', 'top': top,
                'conf': float(probs[top]) if probs.size else 0.0}
        data = _pack(meta, np.asarray(features, np.float32).reshape(-1), probs, self.encode_crop(image_rgb))
        return self._write(stamp_ns, data, created, label or '', source if label else '')

    def _write(self, stamp_ns: int, data: bytes, created: float, label: str, source: str) -> bool:
        path = self.root / f'f_{stamp_ns:020d}.npz'
        with self._lock:
            if len(data) > self.max_bytes:
                self._drop('too_large')
                return False
            old = self._index.pop(stamp_ns, None)
            # make room first so the caps hold while the new file exists (the replaced entry's file is
            # overwritten by the rename, so its bytes are not counted twice)
            self._make_room(1, len(data))
            try:
                atomic_write_bytes(path, data)
            except OSError as e:
                # the temp file is gone (atomic_write_bytes removes it); the old entry, if any, is intact
                if old is not None and path.exists():
                    self._index[stamp_ns] = old
                    self._make_room(0, 0)
                self._drop(errno.errorcode.get(e.errno, 'EIO') if e.errno else type(e).__name__, e)
                return False
            self._index[stamp_ns] = _Meta(path, len(data), created, label, source)
            return True

    def _drop(self, why: str, err: Exception | None = None) -> None:
        self.dropped += 1
        self.dropped_by_errno[why] = self.dropped_by_errno.get(why, 0) + 1
        if err is not None:
            self.last_error = f'{why}: {err}'

    def set_label(self, stamp_ns: int, label: str, source: str = 'topic', force: bool = False) -> bool:
        """Label the entry with ``stamp_ns`` (atomic rewrite). Returns False if there is no such entry,
        the write failed, or the entry already has a label from a more trusted source (unless ``force``)."""
        if self.readonly:
            raise PermissionError('store opened read-only')
        if source not in LABEL_SOURCES:
            raise ValueError(f'label source must be one of {LABEL_SOURCES}, got {source!r}')
        stamp_ns = int(stamp_ns)
        with self._lock:
            meta = self._index.get(stamp_ns)
            if meta is None:
                return False
            if not force and SOURCE_RANK.get(meta.source, 0) > SOURCE_RANK[source]:
                return False
            z = _read(meta.path, _REQUIRED)
            if z is None:
                self._index.pop(stamp_ns, None)  # vanished (another process evicted it) or corrupt
                return False
            z['meta'].update(label=label, source=source)
            data = _pack(z['meta'], z['features'], z['probs'], z['crop'])
            # the rewrite may grow the entry by a few bytes: make room as for a new entry (never evicting
            # this one), then replace the file atomically; on failure the old file is intact
            self._index.pop(stamp_ns)
            self._make_room(1, len(data))
            try:
                atomic_write_bytes(meta.path, data)
            except OSError as e:
                self._index[stamp_ns] = meta
                self._make_room(0, 0)
                self.label_errors += 1
                self.last_error = f'label rewrite failed: {e}'
                return False
            self._index[stamp_ns] = _Meta(meta.path, len(data), meta.created, label, source)
            return True

    def wipe(self) -> int:
        """Delete every entry (and stray temp files). Returns the number of entries removed."""
        if self.readonly:
            raise PermissionError('store opened read-only')
        with self._lock:
            n = len(self._index)
            for s in list(self._index):
                self._remove(s)
            if self.root.is_dir():
                for p in self.root.iterdir():
                    if _NAME.match(p.name) or (p.name.startswith('.') and p.name.endswith('.tmp')):
                        try:
                            p.unlink()
                        except OSError:
                            pass
            return n

    # -- reading ---------------------------------------------------------------------------------------
    def stamps(self) -> list[int]:
        with self._lock:
            return sorted(self._index)

    def label_counts(self) -> dict[str, int]:
        """Number of entries per label source ('' = unlabelled)."""
        with self._lock:
            out = {'unlabelled': 0, **{s: 0 for s in LABEL_SOURCES}}
            for m in self._index.values():
                k = 'unknown' if m.source is None else (m.source or 'unlabelled')
                out[k] = out.get(k, 0) + 1
            return out

    def stats(self) -> dict:
        with self._lock:
            return {'entries': len(self._index), 'bytes': self.total_bytes, 'max_entries': self.max_entries,
                    'max_bytes': self.max_bytes, 'max_age_s': self.max_age_s,
                    'labels': self.label_counts(), 'dropped': self.dropped,
                    'dropped_by_reason': dict(self.dropped_by_errno), 'evicted': self.evicted,
                    'corrupt_removed': self.corrupt_removed,
                    'label_errors': self.label_errors, 'last_error': self.last_error}

    def _load_entries(self, stamps, keys=('meta', 'features', 'probs')) -> list[dict]:
        out = []
        with self._lock:
            metas = [(s, self._index.get(s)) for s in stamps]
        for s, meta in metas:
            if meta is None:
                continue
            z = _read(meta.path, keys)
            if z is None or z['meta']['stamp'] != s:
                continue  # evicted by another process since the scan, or corrupt
            out.append(z)
        return out

    def entries(self, labelled_only: bool = False, sources=None,
                feature_size: int | None = None) -> StoreArrays:
        """All (or only labelled, optionally only from ``sources``) entries as arrays, oldest stamp first.

        Entries whose features do not have ``feature_size`` dims (another backbone) are skipped.
        """
        with self._lock:
            stamps = [s for s, m in sorted(self._index.items())
                      if (not labelled_only or m.label is None or m.label)
                      and (sources is None or m.source is None or m.source in sources)]
        zs = self._load_entries(stamps)
        if feature_size is None and zs:
            feature_size = int(zs[-1]['features'].shape[0])
        zs = [z for z in zs if z['features'].shape == (feature_size,)
              and (not labelled_only or z['meta']['label'])
              and (sources is None or z['meta']['source'] in sources)]
        d = feature_size or 0
        ms = [z['meta'] for z in zs]
        return StoreArrays(
            stamps=np.array([int(m['stamp']) for m in ms], np.int64),
            features=(np.stack([z['features'] for z in zs]).astype(np.float32) if zs
                      else np.zeros((0, d), np.float32)),
            probs=[z['probs'] for z in zs],
            top=np.array([int(m['top']) for m in ms], np.int64),
            conf=np.array([float(m['conf']) for m in ms], np.float32),
            labels=[str(m['label']) or None for m in ms],
            sources=[str(m['source']) for m in ms],
            created=np.array([float(m['created']) for m in ms], np.float64))

    def labelled(self, sources=None, feature_size: int | None = None) -> StoreArrays:
        """Labelled entries (from ``sources``, default all) as arrays."""
        return self.entries(labelled_only=True, sources=sources, feature_size=feature_size)

    def crops(self, stamps) -> tuple[np.ndarray, np.ndarray]:
        """Decoded RGB crops ``[K, h, w, 3]`` of the given stamps and the stamps actually found."""
        zs = self._load_entries([int(s) for s in stamps], keys=('meta', 'crop'))
        imgs, found = [], []
        for z in zs:
            img = cv2.imdecode(z['crop'], cv2.IMREAD_COLOR)
            if img is None:
                continue
            imgs.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
            found.append(int(z['meta']['stamp']))
        if not imgs:
            h, w = self.crop_size
            return np.zeros((0, h, w, 3), np.uint8), np.zeros(0, np.int64)
        shape = imgs[0].shape
        keep = [i for i, im in enumerate(imgs) if im.shape == shape]
        return np.stack([imgs[i] for i in keep]), np.array([found[i] for i in keep], np.int64)


def _pack(meta: dict, features: np.ndarray, probs: np.ndarray, crop: np.ndarray) -> bytes:
    return npz_bytes(meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), features=features,
                     probs=probs, crop=crop)


def _read(path: Path, keys) -> dict | None:
    """The arrays ``keys`` of an entry (``meta`` decoded), or None if it is missing, truncated or corrupt."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if not set(_REQUIRED) <= set(z.files):
                return None
            out = {k: z[k] for k in keys}
        if 'meta' in out:
            meta = json.loads(out['meta'].tobytes().decode())
            if not isinstance(meta, dict) or any(k not in meta for k in _META_KEYS):
                return None
            out['meta'] = meta
        if 'features' in out and (out['features'].ndim != 1 or out['features'].dtype != np.float32):
            return None
        return out
    except Exception:  # OSError, ValueError, zipfile.BadZipFile, EOFError, UnicodeError, ...
        return None
