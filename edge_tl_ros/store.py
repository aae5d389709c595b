"""The adaptation node's on-disk frame store: small crops + cached features + labels, crash-safe.

Layout: ``<root>/f_<stamp_ns:020d>.npz``, one file per entry, keyed by the frame's header stamp (ns),
plus the marker ``<root>/.edge_tl_store`` (JSON ``{"format": 1, ...}``). Each entry is an uncompressed npz
(no pickle) written with :func:`~edge_tl_ros.atomic.atomic_write_bytes` (temp file
``.f_<stamp:020d>.npz.<random>.tmp`` + fsync + rename), so a reader -- this process after a crash, or a
second process -- only ever sees complete entries. An entry holds four arrays (few arrays = fast scans):

    meta        uint8 [J]    UTF-8 JSON: stamp (the frame's header stamp in ns, the key labels refer to),
                             created (wall-clock write time, for age eviction), label (class name,
                             '' = unlabelled), source ('' | 'topic' | 'teacher' | 'self'), top, conf
    features    float32 [D]  the student backbone's features of the frame (finite)
    probs       float32 [C]  the student's class probabilities (finite)
    crop        uint8 [K]    PNG bytes of a small RGB crop (cv2.imencode)

Stamps: valid stamps are integers in ``[0, 2**63)`` (:func:`valid_stamp`; every ROS time with sec >= 0
is one); :func:`stamp_to_ns` never raises for integers and returns what the header says, valid or not.

The store owns its directory and touches nothing it did not write:

- A writable store opens a directory with a valid marker as its own. Without one (or with an unreadable
  one) the directory is claimed -- the marker written -- only when it is empty or holds nothing but
  regular files with names the store writes (entries, temp files; a store of an older version);
  anything else raises :class:`StoreError` and nothing is deleted. A marker of a newer format also
  raises. ``readonly=True`` accepts any directory (no marker needed) and never writes or deletes.
- Only regular files named exactly ``f'f_{stamp:020d}.npz'`` with a valid stamp are entries; only
  regular files named exactly like atomic_write_bytes' temp files of an entry or the marker are temps
  (removed at start-up when older than STALE_TMP_S). ``f_-0000000000000000005.npz`` (how older versions
  stored a negative stamp) is the store's own too but can never be an entry: removed at start-up
  (counted in ``corrupt_removed``) and by :meth:`FrameStore.wipe`. Everything else -- other names,
  symlinks, FIFOs, sockets, directories -- is never followed, read or deleted, and is counted in
  :attr:`FrameStore.skipped` ('foreign', 'not_regular'; also 'too_large', 'unreadable') at each scan.
  Entries are opened with O_NOFOLLOW | O_NONBLOCK and checked with fstat (a FIFO never blocks); files
  larger than ``max(max_bytes, 64 MiB)`` are not read ('too_large'); the arrays are read with
  :func:`~edge_tl_ros.atomic.load_npz` (no pickle, no allocation sized by an untrusted header).

Bounds (count, bytes, age) hold at all times: room is made (oldest ``created`` first) *before* a new
file is written. :meth:`FrameStore.add` validates its input once, here: an invalid stamp, non-finite
features/probs, features of the wrong size (``feature_size``), a bad label, image or time drop the entry,
and so does a write that fails with OSError (ENOSPC, EFBIG, EDQUOT, EIO); every drop is counted in
:attr:`FrameStore.dropped` and, by reason, in ``dropped_by_errno`` (``stats()['dropped_by_reason']``),
and leaves nothing behind. At start-up every entry (meta types, array dtypes/shapes, finiteness) is
validated; truncated, corrupt or non-finite ones are removed and counted in
:attr:`FrameStore.corrupt_removed`, and stale temp files of crashed writers are deleted. Entries that
turn bad later (another writer, a read-only store) are skipped by :meth:`FrameStore.entries` and counted
in :attr:`FrameStore.skipped_non_finite` (non-finite arrays) -- one bad entry never poisons a round.
:meth:`FrameStore.wipe` deletes entries and temps only (never the marker or foreign files) and
:meth:`FrameStore.remaining_entries` says how many entry files are still on disk. Nothing in the store is
ever published.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .atomic import ReadRefused, atomic_write_bytes, load_npz, npz_bytes, npz_file_bound, read_bounded
from .imaging import resize_to

LABEL_SOURCES = ('topic', 'teacher', 'self')
# a label from a more trusted source is never overwritten by a less trusted one
SOURCE_RANK = {'': 0, 'self': 1, 'teacher': 2, 'topic': 3}
MARKER = '.edge_tl_store'
FORMAT = 1  # the marker's format version
STAMP_LIMIT = 1 << 63  # stamps are in [0, STAMP_LIMIT): int64 ns, 20 decimal digits at most
READ_LIMIT = 64 << 20  # entries larger than max(max_bytes, READ_LIMIT) are never read
MAX_META_BYTES = 1 << 16
MAX_LABEL_CHARS = 1024
MAX_CROP_SIDE = 4096  # crops whose PNG header claims more pixels per side are not decoded
_NAME = re.compile(r'^f_([0-9]{20})\.npz$')  # an entry: f'f_{stamp:020d}.npz', 0 <= stamp < 2**63
_ANY_NAME = re.compile(r'^f_(-?[0-9]+)\.npz$')
_TMP = re.compile(r'^\.(.+)\.[A-Za-z0-9_]+\.tmp$')  # atomic_write_bytes: '.' + name + '.' + random + '.tmp'
_REQUIRED = ('meta', 'features', 'probs', 'crop')
_META_KEYS = ('stamp', 'created', 'label', 'source', 'top', 'conf')
STALE_TMP_S = 60.0  # temp files older than this at start-up belong to a crashed writer


class StoreError(ValueError):
    """The store directory cannot be used (it holds files the store did not write, is not a directory,
    or was written by a newer format)."""


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
    """A header stamp (builtin_interfaces/Time: int32 sec, uint32 nanosec) in ns, ``sec * 1e9 + nanosec``:
    a nanosec of 1e9 or more carries into the seconds. Never raises for integers; the result may be
    invalid (negative sec): check it with :func:`valid_stamp` (the store's ``add`` drops such frames)."""
    return int(sec) * 1_000_000_000 + int(nanosec)


def valid_stamp(ns) -> bool:
    """True for an integer stamp (ns) the store can key an entry by: ``0 <= ns < 2**63``."""
    return _stamp(ns) is not None


def _stamp(x) -> int | None:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        return None
    x = int(x)
    return x if 0 <= x < STAMP_LIMIT else None


def _kind(name: str) -> str | None:
    """What a file name is to the store: 'entry', 'legacy' (the name an older version gave an invalid
    stamp, e.g. f_-0000000000000000005.npz), 'tmp' (a temp file of either or of the marker), 'marker',
    or None (a name the store never writes)."""
    if name == MARKER:
        return 'marker'
    m = _TMP.match(name)
    if m:
        return 'tmp' if m.group(1) == MARKER or _kind(m.group(1)) in ('entry', 'legacy') else None
    m = _ANY_NAME.match(name)
    if not m or f'f_{int(m.group(1)):020d}.npz' != name:
        return None
    return 'entry' if _stamp(int(m.group(1))) is not None else 'legacy'


def _entry_stamp(name: str) -> int | None:
    """The stamp of an entry file name (exactly the name the store writes), else None."""
    return int(name[2:-4]) if _kind(name) == 'entry' else None


def _listdir(root: Path) -> list[tuple[str, os.stat_result | None]]:
    """(name, lstat) of everything in ``root`` (lstat None: vanished); [] if ``root`` does not exist."""
    out = []
    try:
        with os.scandir(root) as it:
            for e in it:
                try:
                    out.append((e.name, e.stat(follow_symlinks=False)))
                except OSError:
                    out.append((e.name, None))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return out


def _regular(st: os.stat_result | None) -> bool:
    return st is not None and stat.S_ISREG(st.st_mode)


class FrameStore:
    """A bounded, crash-safe store of frames for on-robot adaptation (thread-safe within a process).

    ``max_age_s <= 0`` disables age eviction. ``crop_size`` is the (height, width) crops are stored at.
    ``feature_size`` (optional) is the only features size :meth:`add` accepts.
    ``readonly=True`` opens an existing store for reading only (a round's worker process): nothing is
    deleted, evicted or written (no marker needed), and the start-up scan only lists files (bad entries
    are skipped when :meth:`entries` reads them).
    A second process may write into the same directory (unique temp names, atomic renames); this
    instance sees its entries after :meth:`rescan`, and the caps apply to the entries it knows.
    Raises :class:`StoreError` for a directory it must not own (see the module docstring).
    """

    def __init__(self, root: str | os.PathLike, max_entries: int = 2000, max_bytes: int = 64 << 20,
                 max_age_s: float = 0.0, crop_size: tuple[int, int] = (32, 32), readonly: bool = False,
                 feature_size: int | None = None):
        self.root = Path(root).expanduser()
        self.readonly = readonly
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.feature_size = None if feature_size is None else int(feature_size)
        self._lock = threading.RLock()
        self._index: dict[int, _Meta] = {}
        self.dropped = 0  # entries not written (bad input, disk full, too large, I/O errors)
        self.dropped_by_errno: dict[str, int] = {}  # by reason: errno name or 'bad_stamp', 'non_finite', ..
        self.corrupt_removed = 0
        self.evicted = 0
        self.label_errors = 0  # label rewrites that failed (the entry keeps its previous label)
        self.skipped: dict[str, int] = {}  # files the last scan left alone, by reason
        self._non_finite: set[int] = set()  # stamps of stored entries entries() skipped (non-finite)
        self.last_error: str | None = None
        self.set_caps(max_entries, max_bytes, max_age_s)
        if not readonly:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise StoreError(f'store_dir {self.root} is not a directory') from None
            self._claim()
        self.rescan()

    # -- ownership -------------------------------------------------------------------------------------
    def _claim(self) -> None:
        """Own the directory: a valid marker, or nothing but the store's own files (then mark it)."""
        if _marker_format(self.root / MARKER) == FORMAT:
            return
        foreign = sorted(n for n, st in _listdir(self.root)
                         if st is not None and not (_regular(st) and _kind(n)))
        if foreign:
            raise StoreError(f'store_dir {self.root} holds files the frame store did not write '
                             f'(e.g. {", ".join(foreign[:3])}); choose an empty or dedicated directory')
        try:
            atomic_write_bytes(self.root / MARKER, json.dumps(
                {'format': FORMAT, 'written_by': 'edge_tl_ros.store.FrameStore'}).encode())
        except OSError as e:  # e.g. a read-only file system: the directory checked out, use it unmarked
            self.last_error = f'cannot write the store marker: {e}'

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

    @property
    def read_limit(self) -> int:
        """Entry files larger than this are never read."""
        return max(self.max_bytes, READ_LIMIT)

    # -- start-up / rescan -----------------------------------------------------------------------------
    def rescan(self) -> None:
        """(Re)build the index from disk: validate every entry, drop corrupt ones, evict to the caps."""
        with self._lock:
            index: dict[int, _Meta] = {}
            skipped: dict[str, int] = {}
            now = time.time()
            for name, st in _listdir(self.root):
                kind = _kind(name)
                if st is None or kind == 'marker':
                    continue
                why = ('foreign' if kind is None else 'not_regular' if not _regular(st) else
                       'bad_stamp' if kind == 'legacy' and self.readonly else
                       'too_large' if kind == 'entry' and st.st_size > self.read_limit else None)
                if why is not None:
                    skipped[why] = skipped.get(why, 0) + 1
                    continue
                path = self.root / name
                if kind == 'tmp':
                    if not self.readonly and now - st.st_mtime > STALE_TMP_S:
                        _unlink(path)
                    continue
                if kind == 'legacy':  # ours, but no entry can have that stamp (outside every cap)
                    self.corrupt_removed += 1
                    _unlink(path)
                    continue
                stamp = int(name[2:-4])
                if self.readonly:  # a round's worker: entries() validates what it reads
                    index[stamp] = _Meta(path, st.st_size, 0.0, None, None)
                    continue
                z, why = _load(path, _REQUIRED, self.read_limit, stamp)
                if z is not None:
                    m = z['meta']
                    index[stamp] = _Meta(path, st.st_size, float(m['created']), m['label'], m['source'])
                elif why in ('corrupt', 'non_finite'):  # ours (the directory is owned) and unusable
                    self.corrupt_removed += 1
                    _unlink(path)
                elif why != 'vanished':
                    skipped[why] = skipped.get(why, 0) + 1
            self._index, self.skipped = index, skipped
            if not self.readonly:
                self._make_room(0, 0)

    # -- bounds ----------------------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(m.size for m in self._index.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def __contains__(self, stamp) -> bool:
        with self._lock:
            return _stamp(stamp) in self._index

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
        img = resize_to(img, h, w)  # the one resize rule (crops normally arrive at crop_size already)
        ok, enc = cv2.imencode('.png', cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2BGR))
        if not ok:
            raise ValueError('OpenCV failed to PNG-encode the crop')
        return enc.reshape(-1)

    def add(self, stamp_ns: int, image_rgb: np.ndarray, features: np.ndarray, probs: np.ndarray,
            label: str | None = None, source: str = '', created: float | None = None) -> bool:
        """Store one frame (replacing an entry with the same stamp). Returns False if it was dropped
        (bad input or a failed write; counted by reason, see the module docstring)."""
        if self.readonly:
            raise PermissionError('store opened read-only')
        if label and source not in LABEL_SOURCES:
            raise ValueError(f'label source must be one of {LABEL_SOURCES}, got {source!r}')
        stamp = _stamp(stamp_ns)
        if stamp is None:
            return self._refuse('bad_stamp', f'stamp {stamp_ns!r} is not an integer in [0, 2**63)')
        try:
            with np.errstate(over='ignore', invalid='ignore'):  # out-of-range values become inf: refused
                feats = np.asarray(features, np.float32).reshape(-1)
                probs = np.asarray(probs, np.float32).reshape(-1)
        except (TypeError, ValueError) as e:
            return self._refuse('bad_shape', f'features/probs are not numeric arrays ({e})')
        if not feats.size or (self.feature_size is not None and feats.size != self.feature_size):
            return self._refuse('bad_shape', f'{feats.size} features, expected {self.feature_size or ">0"}')
        if not (np.isfinite(feats).all() and np.isfinite(probs).all()):
            return self._refuse('non_finite', f'stamp {stamp}: features or probs hold NaN/Inf')
        if label is not None and (not isinstance(label, str) or len(label) > MAX_LABEL_CHARS):
            return self._refuse('bad_label', f'label {str(label)[:40]!r} is not a short string')
        created = time.time() if created is None else created
        if not _finite_number(created):
            return self._refuse('bad_created', f'created {created!r} is not a finite time')
        try:
            crop = self.encode_crop(image_rgb)
        except (cv2.error, ValueError, TypeError, AttributeError, IndexError) as e:
            return self._refuse('bad_image', f'cannot encode the crop ({type(e).__name__}: {e})')
        top = int(np.argmax(probs)) if probs.size else -1
        meta = {'stamp': stamp, 'created': float(created), 'label': label or '',
                'source': source if label else '', 'top': top,
                'conf': float(probs[top]) if probs.size else 0.0}
        return self._write(stamp, _pack(meta, feats, probs, crop), float(created), label or '',
                           source if label else '')

    def _refuse(self, why: str, detail: str) -> bool:
        with self._lock:
            self._drop(why)
            self.last_error = f'{why}: {detail}'
        return False

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
        """Label the entry with ``stamp_ns`` (atomic rewrite). Returns False if there is no such entry
        (an invalid stamp never has one), the label is not a non-empty short string, the write failed,
        or the entry already has a label from a more trusted source (unless ``force``)."""
        if self.readonly:
            raise PermissionError('store opened read-only')
        if source not in LABEL_SOURCES:
            raise ValueError(f'label source must be one of {LABEL_SOURCES}, got {source!r}')
        stamp = _stamp(stamp_ns)
        if stamp is None or not isinstance(label, str) or not label or len(label) > MAX_LABEL_CHARS:
            return False
        with self._lock:
            meta = self._index.get(stamp)
            if meta is None:
                return False
            if not force and SOURCE_RANK.get(meta.source, 0) > SOURCE_RANK[source]:
                return False
            z, _ = _load(meta.path, _REQUIRED, self.read_limit, stamp)
            if z is None:
                self._index.pop(stamp, None)  # vanished (another process evicted it) or corrupt
                return False
            z['meta'].update(label=label, source=source)
            data = _pack(z['meta'], z['features'], z['probs'], z['crop'])
            # the rewrite may grow the entry by a few bytes: make room as for a new entry (never evicting
            # this one), then replace the file atomically; on failure the old file is intact
            self._index.pop(stamp)
            self._make_room(1, len(data))
            try:
                atomic_write_bytes(meta.path, data)
            except OSError as e:
                self._index[stamp] = meta
                self._make_room(0, 0)
                self.label_errors += 1
                self.last_error = f'label rewrite failed: {e}'
                return False
            self._index[stamp] = _Meta(meta.path, len(data), meta.created, label, source)
            return True

    def wipe(self) -> int:
        """Delete every entry and the store's temp files (never the marker, foreign or non-regular
        files). Returns the number of entry files removed; :meth:`remaining_entries` says what is left
        (entries that could not be deleted stay indexed)."""
        if self.readonly:
            raise PermissionError('store opened read-only')
        removed = 0
        with self._lock:
            for name, st in _listdir(self.root):
                kind = _kind(name)
                if _regular(st) and kind in ('entry', 'legacy', 'tmp'):
                    try:
                        os.unlink(self.root / name)
                        removed += kind != 'tmp'
                    except FileNotFoundError:
                        pass
                    except OSError as e:
                        self.last_error = f'cannot remove {name}: {e}'
            self._index = {s: m for s, m in self._index.items() if os.path.lexists(m.path)}
        return removed

    def remaining_entries(self) -> int:
        """Entry files on disk right now (regular files named like entries, legacy names included; never
        foreign files)."""
        return sum(_regular(st) and _kind(n) in ('entry', 'legacy') for n, st in _listdir(self.root))

    # -- reading ---------------------------------------------------------------------------------------
    def stamps(self) -> list[int]:
        with self._lock:
            return sorted(self._index)

    @property
    def skipped_non_finite(self) -> int:
        """Stored entries with NaN/Inf features or probs that reads skipped (each counted once)."""
        with self._lock:
            return len(self._non_finite)

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
                    'corrupt_removed': self.corrupt_removed, 'skipped': dict(self.skipped),
                    'skipped_non_finite': len(self._non_finite),
                    'label_errors': self.label_errors, 'last_error': self.last_error}

    def _load_entries(self, stamps, keys=('meta', 'features', 'probs')) -> list[dict]:
        out = []
        with self._lock:
            metas = [(s, self._index.get(s)) for s in stamps]
        for s, meta in metas:
            if meta is None:
                continue
            z, why = _load(meta.path, keys, self.read_limit, s)
            if z is not None:
                out.append(z)
            elif why == 'non_finite':
                with self._lock:
                    self._non_finite.add(s)
            # else: evicted by another process since the scan, corrupt, or replaced by a non-file
        return out

    def entries(self, labelled_only: bool = False, sources=None,
                feature_size: int | None = None) -> StoreArrays:
        """All (or only labelled, optionally only from ``sources``) entries as arrays, oldest stamp first.

        Entries whose features do not have ``feature_size`` dims (another backbone) are skipped, and so
        are unreadable ones and those with non-finite features/probs (:attr:`skipped_non_finite`).
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
        zs = self._load_entries([s for s in map(_stamp, stamps) if s is not None], keys=('meta', 'crop'))
        imgs, found = [], []
        for z in zs:
            img = _decode_png(z['crop'])
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


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _finite_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) \
        and math.isfinite(v)


def _marker_format(path: Path):
    """The format of a valid marker file; None if missing or unreadable; StoreError if newer."""
    try:
        fmt = json.loads(read_bounded(path, 4096, follow_symlinks=False).decode()).get('format')
    except Exception:  # missing, not a regular file, garbage: the directory is checked as if unmarked
        return None
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        return None
    if fmt > FORMAT:
        raise StoreError(f'store_dir {path.parent} was written by a newer frame store (format {fmt}, '
                         f'this one reads {FORMAT})')
    return fmt


def _meta_ok(m, stamp: int | None) -> bool:
    if not isinstance(m, dict) or any(k not in m for k in _META_KEYS):
        return False
    s, top, label, source = m['stamp'], m['top'], m['label'], m['source']
    return (_stamp(s) is not None and (stamp is None or s == stamp)
            and _finite_number(m['created']) and _finite_number(m['conf'])
            and isinstance(top, int) and not isinstance(top, bool) and -1 <= top < 1 << 31
            and isinstance(label, str) and len(label) <= MAX_LABEL_CHARS
            and isinstance(source, str) and source in SOURCE_RANK)


def _load(path, keys, limit: int = READ_LIMIT, stamp: int | None = None):
    """``(arrays, None)``: the arrays ``keys`` of a well-formed entry (``meta`` decoded and checked,
    features/probs finite float32 vectors), or ``(None, reason)`` with reason 'vanished', 'not_regular',
    'unreadable', 'too_large', 'corrupt' or 'non_finite'. Never raises."""
    path = Path(path)
    stamp = _entry_stamp(path.name) if stamp is None else stamp
    try:  # never follows a symlink, never blocks on a FIFO, never reads a huge file
        data = read_bounded(path, npz_file_bound(limit), follow_symlinks=False)
    except FileNotFoundError:
        return None, 'vanished'
    except ReadRefused as e:
        return None, e.reason
    except OSError:
        return None, 'unreadable'
    try:
        out = load_npz(path, max_bytes=limit, data=data, keys=keys)  # bounded: no bomb, no pickle
        for k, a in out.items():
            if a.ndim != 1 or a.dtype != (np.float32 if k in ('features', 'probs') else np.uint8) \
                    or (k == 'features' and not a.size) or (k == 'meta' and a.size > MAX_META_BYTES):
                return None, 'corrupt'
        if 'meta' in out:
            out['meta'] = json.loads(out['meta'].tobytes().decode())
            if not _meta_ok(out['meta'], stamp):
                return None, 'corrupt'
        if not all(np.isfinite(out[k]).all() for k in ('features', 'probs') if k in out):
            return None, 'non_finite'
        return out, None
    except Exception:  # OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, UnicodeError, ...
        return None, 'corrupt'


def _read(path, keys, limit: int = READ_LIMIT) -> dict | None:
    """The arrays ``keys`` of an entry (``meta`` decoded), or None if it is missing, truncated, corrupt,
    non-finite, too large or not a regular file. Never raises, never blocks."""
    return _load(path, keys, limit)[0]


def _decode_png(buf: np.ndarray):
    """BGR image of a stored crop, or None (not a PNG, a header claiming a huge image, undecodable)."""
    head = buf[:24].tobytes()
    if len(head) < 24 or head[:8] != b'\x89PNG\r\n\x1a\n' or head[12:16] != b'IHDR':
        return None
    w, h = struct.unpack('>II', head[16:24])
    if not (0 < w <= MAX_CROP_SIDE and 0 < h <= MAX_CROP_SIDE):
        return None
    try:
        return cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error:
        return None
