"""The model bundle: the one on-disk format shared by training, perception and adaptation.

A bundle is a directory ``models/<name>/``::

    manifest.yaml      format_version, name, task, class_names, input (size, colour order, normalisation),
                       feature_size, files, sha256 of every file, metrics (+ the data they came from),
                       creation command
    backbone.onnx      image [N,3,H,W] float32 (normalised) -> features [N,D] float32
    head.npz           weight [C,D] float32, bias [C] float32, class_names [C] str   (head version 0)
    full.onnx          optional: backbone + head fused, image -> logits [N,C]
    backbone.int8.onnx optional: statically quantised backbone (QDQ), used when it pays
    anchor.npz         optional: source-domain anchor set, features [M,D] + labels [M], optionally the
                       source images [M,H,W,3] uint8 RGB at the input size (to check an adapted backbone)

File paths in the manifest are relative, inside the bundle (no absolute path, no ``..``). An ONNX file
whose tensors live in external data files may only reference files inside the bundle that the manifest's
``sha256`` covers (list them under ``files``). Class names are 1..``MAX_CLASSES`` unique strings of at
most ``MAX_CLASS_NAME_CHARS`` characters without control characters (:func:`check_class_name`).

Head versions written on the robot (by the adaptation node) live in a *state directory*, not in the
(possibly read-only, installed) bundle: ``<state_dir>/heads/head_v<N>.npz`` plus ``index.json``; see
:class:`HeadRegistry`. Everything read from disk is validated once here: ``load_bundle`` and the registry
raise :class:`BundleError` (a ValueError) with one clear line on any problem, never another exception.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import mmap
import numbers
import os
import re
import stat
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import yaml

from .atomic import (atomic_write_bytes, atomic_write_json, load_npz, npz_bytes, npz_file_bound,
                     read_bounded)

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
COLOR_ORDERS = ('rgb', 'bgr')
MAX_CLASSES = 10_000  # classes of a bundle or head (new classes learnt on the robot included)
MAX_CLASS_NAME_CHARS = 256
MAX_FEATURE_SIZE = 8192
MAX_INPUT_SIDE = 8192  # network input height / width
MAX_MANIFEST_BYTES = 4 << 20
MAX_INDEX_BYTES = 4 << 20  # heads/index.json
MAX_VERSION = 10**15 - 1
STRAY_AGE_S = 60.0  # an unregistered head_v<N>.npz / temp file this old is a crash leftover
_ONNX_KEYS = ('backbone', 'full', 'backbone_int8')
_SHA256 = re.compile(r'[0-9a-f]{64}')
_VERSION_KEY = re.compile(r'[1-9][0-9]{0,14}')
_STRAY = re.compile(r'(?:head_v(?P<v>[1-9][0-9]*)\.npz|backbone_v(?P<w>[1-9][0-9]*)\.onnx)'
                    r'|\.((head_v[0-9]+\.npz|backbone_v[0-9]+\.onnx|index\.json)\.[A-Za-z0-9_]+\.tmp)')
_BAD_CHAR_CATEGORIES = ('Cc', 'Cs', 'Zl', 'Zp')  # control characters, lone surrogates, line breaks


class BundleError(ValueError):
    """A model bundle or head file is missing, corrupt, or inconsistent with its manifest."""


def _short(x, n: int = 60) -> str:
    r = repr(x) if not isinstance(x, (dict, list, tuple)) or len(x) < 20 else f'<{type(x).__name__}>'
    return r if len(r) <= n else r[:n] + '...'


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # never blocks on a FIFO
    with os.fdopen(fd, 'rb') as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise BundleError(f'{path}: not a regular file')
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def check_class_name(name) -> str | None:
    """Why ``name`` cannot be a class name, or None if it can: a non-empty string of at most
    ``MAX_CLASS_NAME_CHARS`` characters without control characters, line breaks or lone surrogates."""
    if not isinstance(name, str):
        return f'not a string ({type(name).__name__})'
    if not name.strip():
        return 'empty'
    if len(name) > MAX_CLASS_NAME_CHARS:
        return f'longer than {MAX_CLASS_NAME_CHARS} characters'
    if not name.isprintable() and any(unicodedata.category(c) in _BAD_CHAR_CATEGORIES for c in name):
        return 'contains control characters'
    return None


def _check_class_names(names, what: str) -> tuple[str, ...]:
    """``names`` as a tuple of str, or BundleError saying what is wrong with it."""
    if isinstance(names, np.ndarray):
        names = names.tolist() if names.ndim == 1 else None
    if not isinstance(names, (list, tuple)):
        raise BundleError(f'{what} must be a list of strings, got {type(names).__name__}')
    if not 1 <= len(names) <= MAX_CLASSES:
        raise BundleError(f'{what}: {len(names)} classes, must be 1..{MAX_CLASSES}')
    for i, c in enumerate(names):
        why = check_class_name(c)
        if why is not None:
            raise BundleError(f'{what}: class name #{i} {_short(c)} is {why}')
    names = tuple(str(c) for c in names)
    if len(set(names)) != len(names):
        seen = set()
        dup = next(c for c in names if c in seen or seen.add(c))
        raise BundleError(f'{what}: class name {dup[:60]!r} appears more than once')
    return names


def _float32_array(x, what: str) -> np.ndarray:
    try:
        a = np.asarray(x)
        if a.dtype.kind not in 'fiu':
            raise BundleError(f'{what} must be numeric, got dtype {a.dtype}')
        with np.errstate(over='ignore', invalid='ignore'):
            return a.astype(np.float32, order='C', copy=False)  # (ascontiguousarray would make 0-d 1-d)
    except (ValueError, TypeError, OverflowError) as e:
        if isinstance(e, BundleError):
            raise
        raise BundleError(f'{what} is not a numeric array ({type(e).__name__}: {str(e)[:100]})') from e


def backbone_max_bytes(bundle: 'ModelBundle') -> int:
    """Bound on an adapted backbone file: the same graph as the bundle's, so a small multiple of it."""
    try:
        size = bundle.files['backbone'].stat().st_size
    except OSError:
        size = 0
    return max(4 << 20, 2 * size + (1 << 20))


def head_max_bytes(feature_size: int) -> int:
    """Bound on the inflated arrays of a head file with ``feature_size`` features: weight and bias of up to
    ``MAX_CLASSES`` classes plus their names (what :meth:`HeadRegistry.add` can write)."""
    return 4 * MAX_CLASSES * (int(feature_size) + 1 + MAX_CLASS_NAME_CHARS) + (1 << 16)


@dataclass(frozen=True)
class Head:
    """A linear classifier on backbone features: ``logits = features @ weight.T + bias``.

    Immutable, so the perception node can swap the whole object with one reference assignment. Validated
    on construction (BundleError): numeric finite arrays of matching shapes, 1..``MAX_CLASSES`` unique
    valid class names (:func:`check_class_name`), 1..``MAX_FEATURE_SIZE`` features, version >= 0.
    """

    weight: np.ndarray  # [C, D] float32
    bias: np.ndarray  # [C] float32
    class_names: tuple[str, ...]
    version: int = 0

    def __post_init__(self):
        w = _float32_array(self.weight, 'head weight')
        b = _float32_array(self.bias, 'head bias')
        if w.ndim != 2 or 0 in w.shape:
            raise BundleError(f'head weight must be 2-D [classes, features], got shape {w.shape}')
        if b.ndim != 1:
            raise BundleError(f'head bias must be 1-D [classes], got shape {b.shape}')
        if w.shape[1] > MAX_FEATURE_SIZE:
            raise BundleError(f'head has {w.shape[1]} features, more than {MAX_FEATURE_SIZE}')
        names = self.class_names
        if isinstance(names, np.ndarray) and names.ndim == 1:
            names = names.tolist()
        if not isinstance(names, (list, tuple)):
            raise BundleError(f'head class_names must be a list of strings, got {type(names).__name__}')
        if not b.shape[0] == w.shape[0] == len(names):
            raise BundleError(f'head has {w.shape[0]} weight rows, {b.shape[0]} biases and {len(names)} '
                              'class names; they must agree')
        names = _check_class_names(names, 'head class_names')
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise BundleError('head contains NaN or Inf (or values beyond float32)')
        v = self.version
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v <= MAX_VERSION:
            raise BundleError(f'head version must be an integer in 0..{MAX_VERSION}, got {_short(v)}')
        w.setflags(write=False)
        b.setflags(write=False)
        object.__setattr__(self, 'weight', w)
        object.__setattr__(self, 'bias', b)
        object.__setattr__(self, 'class_names', names)
        object.__setattr__(self, 'version', int(v))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def feature_size(self) -> int:
        return self.weight.shape[1]

    def logits(self, features: np.ndarray) -> np.ndarray:
        return features @ self.weight.T + self.bias

    def to_bytes(self) -> bytes:
        return npz_bytes(weight=self.weight, bias=self.bias,
                         class_names=np.array(self.class_names, dtype=np.str_),
                         version=np.int64(self.version))

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike, version: int | None = None,
             max_bytes: int = head_max_bytes(MAX_FEATURE_SIZE), data: bytes | None = None) -> 'Head':
        """Load a head file (or its bytes ``data``, already read from ``path``); BundleError on any problem.
        ``max_bytes`` bounds the inflated arrays (:func:`head_max_bytes` of the bundle's feature size)."""
        path = Path(path)
        if data is None and not path.is_file():
            raise BundleError(f'head file not found: {path}')
        try:
            if data is None:
                with open(path, 'rb') as f:
                    magic = f.read(4)
            else:
                magic = data[:4]
            if magic != b'PK\x03\x04':
                raise BundleError(f'{path}: not an npz head file (refusing to unpickle or guess the format)')
            z = load_npz(path, max_bytes=max_bytes, data=data)
        except (ValueError, OSError) as e:
            raise BundleError(str(e) if isinstance(e, ValueError) else f'{path}: cannot read it ({e})') from e
        missing = {'weight', 'bias', 'class_names'} - set(z)
        if missing:
            raise BundleError(f'{path}: head file lacks {sorted(missing)}')
        names = z['class_names']
        if names.dtype.kind != 'U' or names.ndim != 1:
            raise BundleError(f'{path}: class_names must be a 1-D array of strings, got {names.dtype} '
                              f'{names.shape}')
        if version is None:
            v = z.get('version', np.int64(0))
            if v.shape != () or v.dtype.kind not in 'iu':
                raise BundleError(f'{path}: version must be one integer, got {v.dtype} {v.shape}')
            version = int(v)
        try:
            return cls(z['weight'], z['bias'], tuple(names.tolist()), version)
        except BundleError as e:
            raise BundleError(f'{path}: {e}') from e


@dataclass
class ModelBundle:
    """A validated bundle directory; see the module docstring for the layout."""

    root: Path
    manifest: dict
    head: Head
    anchor: tuple[np.ndarray, np.ndarray] | None = None
    anchor_images: np.ndarray | None = None  # [M,H,W,3] uint8 RGB, same rows as ``anchor``
    files: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.manifest.get('name', self.root.name))

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.manifest['class_names'])

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the network input."""
        i = self.manifest['input']
        return int(i['height']), int(i['width'])

    @property
    def color_order(self) -> str:
        return self.manifest['input']['color_order']

    @property
    def mean(self) -> np.ndarray:
        return np.asarray(self.manifest['input']['mean'], dtype=np.float32)

    @property
    def std(self) -> np.ndarray:
        return np.asarray(self.manifest['input']['std'], dtype=np.float32)

    @property
    def feature_size(self) -> int:
        return int(self.manifest['feature_size'])

    def path(self, key: str) -> Path | None:
        """Path of an optional file by its manifest key (backbone, head, full, backbone_int8, anchor)."""
        rel = self.manifest.get('files', {}).get(key)
        return self.root / rel if rel else None


REQUIRED_KEYS = ('format_version', 'name', 'task', 'class_names', 'input', 'feature_size', 'files', 'sha256')


def _safe_rel(rel) -> str | None:
    """``rel`` normalised if it is a relative path inside the bundle (no absolute path, no ``..``)."""
    if not isinstance(rel, str) or not rel or '\x00' in rel or '\\' in rel:
        return None
    p = PurePosixPath(rel)
    if p.is_absolute() or '..' in p.parts or str(p) == '.':
        return None
    return str(p)


def _is_int(x, lo: int, hi: int) -> bool:
    return type(x) is int and lo <= x <= hi  # not bool, not float


def _is_real(x, lo: float, hi: float) -> bool:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(float(x)) and lo <= float(x) <= hi
    except OverflowError:
        return False


def _check_manifest(m, mpath: Path) -> dict:
    """Validate every field :class:`ModelBundle` and :func:`load_bundle` read; normalise file paths."""
    def bad(what):
        return BundleError(f'{mpath}: {what}')

    if not isinstance(m, dict):
        raise bad('manifest must be a mapping')
    missing = [k for k in REQUIRED_KEYS if k not in m]
    if missing:
        raise bad(f'missing keys {missing}')
    fv = m['format_version']
    if type(fv) is not int or fv not in SUPPORTED_FORMAT_VERSIONS:
        raise bad(f'manifest format_version {_short(fv)} is not supported by this edge_tl_ros (supports '
                  f'{list(SUPPORTED_FORMAT_VERSIONS)}); re-export the bundle or upgrade')
    name = m['name']
    if (check_class_name(name) is not None or len(name) > 128 or '/' in name or '\\' in name
            or name in ('.', '..')):
        raise bad(f'name must be a short string usable as a directory name, got {_short(name)}')
    if not isinstance(m['task'], str):
        raise bad(f'task must be a string, got {_short(m["task"])}')
    try:
        _check_class_names(m['class_names'], 'class_names')
    except BundleError as e:
        raise bad(e) from None
    inp = m['input']
    if not isinstance(inp, dict):
        raise bad(f'input must be a mapping, got {_short(inp)}')
    for k in ('height', 'width', 'color_order', 'mean', 'std'):
        if k not in inp:
            raise bad(f'input.{k} missing')
    for k in ('height', 'width'):
        if not _is_int(inp[k], 1, MAX_INPUT_SIDE):
            raise bad(f'input.{k} must be an integer in 1..{MAX_INPUT_SIDE}, got {_short(inp[k])}')
    if not isinstance(inp['color_order'], str) or inp['color_order'] not in COLOR_ORDERS:
        raise bad(f'input.color_order must be one of {COLOR_ORDERS}')
    mean, std = inp['mean'], inp['std']
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == 3 and len(std) == 3
            and all(_is_real(v, -1e6, 1e6) for v in mean) and all(_is_real(v, 1e-6, 1e6) for v in std)):
        raise bad('input.mean/std must be 3 finite values each, |mean| <= 1e6, std > 0 (1e-6..1e6)')
    if not _is_int(m['feature_size'], 1, MAX_FEATURE_SIZE):
        raise bad(f'feature_size must be an integer in 1..{MAX_FEATURE_SIZE}, '
                  f'got {_short(m["feature_size"])}')
    files, sha = m['files'], m['sha256']
    if not isinstance(files, dict):
        raise bad(f'files must be a mapping of key: relative path, got {_short(files)}')
    if not isinstance(sha, dict):
        raise bad(f'sha256 must be a mapping of relative path: hex digest, got {_short(sha)}')
    for k in ('backbone', 'head'):
        if k not in files:
            raise bad(f'files.{k} missing')
    norm = {}
    for k, rel in files.items():
        if not isinstance(k, str) or _safe_rel(rel) is None:
            raise bad(f'files.{_short(k)}: {_short(rel)} must be a relative path inside the bundle '
                      '(no absolute path, no "..")')
        norm[k] = _safe_rel(rel)
    norm_sha = {}
    for rel, digest in sha.items():
        if _safe_rel(rel) is None or not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise bad(f'sha256 entry {_short(rel)}: {_short(digest)} must map a relative path inside the '
                      'bundle to 64 lowercase hex digits')
        norm_sha[_safe_rel(rel)] = digest
    return {**m, 'files': norm, 'sha256': norm_sha}


def read_manifest(root: str | os.PathLike) -> dict:
    root = Path(root)
    mpath = root / 'manifest.yaml'
    if not root.is_dir():
        raise BundleError(f'model bundle directory not found: {root}')
    if not mpath.is_file():
        raise BundleError(f'{root}: no manifest.yaml (is this a model bundle directory?)')
    try:
        manifest = yaml.safe_load(read_bounded(mpath, MAX_MANIFEST_BYTES).decode('utf-8'))
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f' at line {mark.line + 1}, column {mark.column + 1}' if mark is not None else ''
        why = ' '.join(str(getattr(e, 'problem', None) or e).split())
        raise BundleError(f'{mpath}: invalid YAML{where}: {why}') from e
    except RecursionError as e:
        raise BundleError(f'{mpath}: invalid YAML: nested too deeply') from e
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise BundleError(f'{mpath}: cannot read the manifest ({type(e).__name__}: {str(e)[:200]})') from e
    return _check_manifest(manifest, mpath)


def load_bundle(root: str | os.PathLike, verify_hashes: bool = True, check_onnx: bool = True) -> ModelBundle:
    """Load and validate a bundle. Raises :class:`BundleError` with a clear message on any problem.

    With ``verify_hashes`` every listed file and every external data file an ONNX file references is
    checked against the manifest's sha256 (an uncovered external data file is refused)."""
    root = Path(root).expanduser()
    manifest = read_manifest(root)
    files, verified = {}, set()

    def verify(rel: str, what: str) -> None:
        p = root / rel
        if not p.is_file():
            raise BundleError(f'{root}: file {rel!r} ({what}) listed in manifest.yaml is '
                              f'{"not a regular file" if p.exists() else "missing"}')
        if verify_hashes and rel not in verified:
            want = manifest['sha256'].get(rel)
            if want is None:
                raise BundleError(f'{root}: manifest.yaml has no sha256 for {rel!r}')
            try:
                got = sha256_file(p)
            except OSError as e:
                raise BundleError(f'{root}: cannot read {rel!r} ({e})') from e
            if got != want:
                raise BundleError(
                    f'{root}: sha256 mismatch for {rel!r} (manifest {want[:12]}..., file {got[:12]}...); '
                    'the file is corrupt or was replaced')
            verified.add(rel)

    for key, rel in manifest['files'].items():
        verify(rel, key)
        files[key] = root / rel
    for key, rel in manifest['files'].items():
        if key in _ONNX_KEYS or rel.endswith('.onnx'):
            for loc in _onnx_external_data(files[key]):
                ext = _safe_rel(str(PurePosixPath(rel).parent / loc)) if _safe_rel(loc) else None
                if ext is None:
                    raise BundleError(f'{files[key]}: ONNX external data {loc[:100]!r} lies outside the '
                                      'bundle')
                if verify_hashes and ext not in manifest['sha256']:
                    raise BundleError(f'{root}: ONNX external data {ext!r} of {rel!r} is not covered by '
                                      'manifest sha256 (list it under files)')
                verify(ext, f'external data of {key}')
    fs = manifest['feature_size']
    head = Head.load(files['head'], version=0, max_bytes=head_max_bytes(fs))
    classes = tuple(manifest['class_names'])
    if head.class_names != classes:
        raise BundleError(f'{root}: head has {head.num_classes} classes {list(head.class_names)[:5]}..., '
                          f'manifest lists {len(classes)}; they must match')
    if head.feature_size != fs:
        raise BundleError(f'{root}: head expects {head.feature_size} features, manifest feature_size is {fs}')
    anchor = anchor_images = None
    if 'anchor' in files:
        *anchor, anchor_images = _load_anchor(files['anchor'], fs, len(classes))
        anchor = tuple(anchor)
    bundle = ModelBundle(root=root, manifest=manifest, head=head, anchor=anchor, files=files,
                         anchor_images=anchor_images)
    if check_onnx:
        _check_onnx_shapes(bundle)
    if anchor_images is not None:  # after the ONNX check: a wrong input size is named as such first
        want = (len(anchor[1]), *bundle.input_size, 3)
        if anchor_images.shape != want:
            raise BundleError(f'{files["anchor"]}: anchor images must be uint8 {list(want)} (the input '
                              f'size), got {list(anchor_images.shape)}')
    return bundle


def _load_anchor(path: Path, feature_size: int, num_classes: int):
    """(features, labels, images or None) of an anchor file, validated."""
    try:
        z = load_npz(path)
    except ValueError as e:
        raise BundleError(str(e)) from e
    if 'features' not in z or 'labels' not in z:
        raise BundleError(f'{path}: anchor set needs arrays features and labels')
    feats, labels = z['features'], z['labels']
    if feats.dtype.kind not in 'fiu' or labels.dtype.kind not in 'iu':
        raise BundleError(f'{path}: anchor features ({feats.dtype}) must be numeric, labels ({labels.dtype}) '
                          'integers')
    with np.errstate(over='ignore', invalid='ignore'):
        feats, labels = feats.astype(np.float32), labels.astype(np.int64)
    if feats.ndim != 2 or feats.shape[1] != feature_size or labels.shape != (len(feats),):
        raise BundleError(f'{path}: anchor features {feats.shape} / labels {labels.shape} '
                          f'do not fit feature_size {feature_size}')
    if not np.isfinite(feats).all():
        raise BundleError(f'{path}: anchor features contain NaN or Inf')
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise BundleError(f'{path}: anchor labels outside 0..{num_classes - 1}')
    images = z.get('images')
    if images is not None and (images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3):
        raise BundleError(f'{path}: anchor images must be uint8 [N, H, W, 3], got {images.dtype} '
                          f'{list(images.shape)}')
    return feats, labels, images


def _onnx_external_data(path: Path) -> list[str]:
    """The external data locations the ONNX file ``path`` references. ONNX Runtime needs a ``location``
    key for any external tensor, so a file without those bytes has none (no parse, no onnx import)."""
    try:
        with open(path, 'rb') as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if mm.find(b'location') < 0:
                return []
    except ValueError:  # an empty file cannot be mapped: ONNX Runtime refuses it later
        return []
    except OSError as e:
        raise BundleError(f'{path}: cannot read it ({e})') from e
    try:
        import onnx
    except ImportError as e:
        raise BundleError(f'{path}: may reference external data; the onnx package is needed to check '
                          'it') from e
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise BundleError(f'{path}: not a valid ONNX file ({type(e).__name__}: {str(e)[:100]})') from e
    graphs = [model.graph] + [g for t in model.training_info for g in (t.initialization, t.algorithm)]
    attr_lists = [f.attribute_proto for f in model.functions]
    nodes = [n for f in model.functions for n in f.node]
    tensors, locations = [], set()
    while graphs or nodes or attr_lists:  # every tensor of every (sub)graph, node attribute and function
        if graphs:
            g = graphs.pop()
            tensors += g.initializer
            tensors += [t for s in g.sparse_initializer for t in (s.values, s.indices)]
            nodes += g.node
        elif nodes:
            attr_lists.append(nodes.pop().attribute)
        else:
            for a in attr_lists.pop():
                tensors += ([a.t] if a.HasField('t') else []) + list(a.tensors)
                sparse = ([a.sparse_tensor] if a.HasField('sparse_tensor') else []) + list(a.sparse_tensors)
                tensors += [t for s in sparse for t in (s.values, s.indices)]
                graphs += ([a.g] if a.HasField('g') else []) + list(a.graphs)
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data):
            loc = {e.key: e.value for e in t.external_data}.get('location', '')
            if not loc:
                raise BundleError(f'{path}: tensor {t.name[:60]!r} has external data without a location')
            locations.add(loc)
    return sorted(locations)


def _check_onnx_shapes(bundle: ModelBundle) -> None:
    """Open each ONNX file's metadata (cheap) and check input/output shapes against the manifest."""
    import onnxruntime as ort

    h, w = bundle.input_size
    expect_out = {'backbone': bundle.feature_size, 'backbone_int8': bundle.feature_size,
                  'full': len(bundle.class_names)}
    for key, out_dim in expect_out.items():
        p = bundle.files.get(key)
        if p is None:
            continue
        try:
            so = ort.SessionOptions()
            so.log_severity_level = 3
            sess = ort.InferenceSession(str(p), so, providers=['CPUExecutionProvider'])
        except Exception as e:  # onnxruntime raises its own exception types
            raise BundleError(f'{p}: cannot be loaded by ONNX Runtime (truncated or corrupt?): '
                              f'{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}') from e
        if len(sess.get_inputs()) != 1 or not sess.get_outputs():
            raise BundleError(f'{p}: needs exactly one input and an output, has {len(sess.get_inputs())} '
                              f'inputs and {len(sess.get_outputs())} outputs')
        ishape = sess.get_inputs()[0].shape
        oshape = sess.get_outputs()[0].shape
        if len(ishape) != 4 or ishape[1] != 3 or ishape[2] != h or ishape[3] != w:
            raise BundleError(f'{p}: input shape {ishape} does not match manifest input [N,3,{h},{w}]')
        if len(oshape) != 2 or oshape[1] != out_dim:
            raise BundleError(f'{p}: output shape {oshape} does not match expected [N,{out_dim}]')


def write_manifest(root: str | os.PathLike, manifest: dict) -> Path:
    """Recompute sha256 for every listed file and write manifest.yaml atomically."""
    root = Path(root)
    manifest = dict(manifest)
    manifest.setdefault('format_version', FORMAT_VERSION)
    manifest['sha256'] = {rel: sha256_file(root / rel) for rel in manifest['files'].values()}
    text = yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True, width=110)
    return atomic_write_bytes(root / 'manifest.yaml', text.encode())


def _as_version(v) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v <= MAX_VERSION:
        raise BundleError(f'head version must be an integer in 0..{MAX_VERSION}, got {_short(v)}')
    return int(v)


class HeadRegistry:
    """Versioned heads of one bundle, kept in ``<state_dir>/heads``.

    Version 0 is the bundle's own ``head.npz``. Each accepted adaptation writes ``head_v<N>.npz``
    (atomically) and registers it in ``index.json`` (also atomic)::

        {"current": N, "accepted": [0, .., N],
         "versions": {"N": {"file": "head_v<N>.npz", "sha256": <hex>, "created", "metrics", ...,
                            "backbone": {"file": "backbone_v<N>.onnx", "sha256": <hex>}}}}

    A version may carry its own backbone (``backbone_v<N>.onnx``: the bundle's backbone with statistics
    re-estimated on robot frames, :func:`edge_tl_ros.ttn.adapted_backbone`); its head was trained on that
    backbone's features, so the two load, roll back and fall back together (``with_backbone=True``
    returns ``(head, backbone bytes or None)``; None = the bundle's backbone).

    ``rollback()`` moves ``current`` to the previous accepted version (and drops the later ones from
    ``accepted``; their files stay, so ``activate`` can undo it). A version loads only if its file's sha256
    (required, checked before the file is parsed) matches the index. The index is validated as a whole
    when read (:meth:`_validate_index`): anything malformed is a BundleError, and
    :meth:`load_current_or_fallback` then uses the bundle head.

    Retention: with ``keep_versions`` > 0, :meth:`add` deletes the oldest registered versions beyond the
    newest ``keep_versions`` (file and index entry, and from ``accepted``), never the current version,
    its rollback target or v0 (the bundle's file is never touched), plus unregistered ``head_v<N>.npz``
    and temp files older than ``STRAY_AGE_S`` (crash leftovers; everything happens under the lock).
    0 (the default) keeps everything; the adaptation node passes its ``keep_head_versions`` parameter.

    ``heads/.lock`` is opened without following symlinks: a symlink or non-regular file there is a
    BundleError, never a file created elsewhere. ``heads`` itself may be a symlink (state on another
    volume is the operator's choice); a dangling one reads as "no adapted heads" and writes fail with
    the OS error.
    """

    def __init__(self, bundle: ModelBundle, state_dir: str | os.PathLike, keep_versions: int = 0):
        try:
            keep_versions = _as_version(keep_versions)
        except BundleError:
            raise ValueError(f'keep_versions must be an integer >= 0, got {keep_versions!r}') from None
        self.bundle = bundle
        self.keep_versions = int(keep_versions)
        self.dir = Path(state_dir).expanduser() / 'heads'
        self.index_path = self.dir / 'index.json'

    # -- index ---------------------------------------------------------------------------------------
    def _read_index(self) -> dict:
        try:
            data = read_bounded(self.index_path, MAX_INDEX_BYTES)
        except FileNotFoundError:
            return {'current': 0, 'accepted': [0], 'versions': {}}
        except (OSError, ValueError) as e:
            raise self._corrupt(f'{type(e).__name__}: {e}') from e
        try:
            obj = json.loads(data.decode('utf-8'))
        except RecursionError as e:
            raise self._corrupt('nested too deeply') from e
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, a too long integer
            raise self._corrupt(' '.join(str(e).split())[:200]) from e
        return self._validate_index(obj)

    def _corrupt(self, why: str) -> BundleError:
        return BundleError(f'{self.index_path}: corrupt head index ({why}); delete it to fall back to the '
                           'bundle head')

    def _validate_index(self, obj) -> dict:
        """The index normalised (``current`` and ``accepted`` ints, ``versions`` keyed by canonical
        positive integer strings, each a dict) or BundleError. ``current`` must be 0 or registered;
        ``accepted`` entries that are not registered are dropped, 0 comes first. Entries' other fields
        (sha256 included) are checked where they are used."""
        if not isinstance(obj, dict):
            raise self._corrupt(f'top level is {type(obj).__name__}, not an object')
        versions = obj.get('versions')
        if not isinstance(versions, dict):
            raise self._corrupt(f'"versions" must be an object, got {_short(versions)}')
        for key, meta in versions.items():
            if not _VERSION_KEY.fullmatch(key):
                raise self._corrupt(f'version key {_short(key)} is not an integer in 1..{MAX_VERSION}')
            if not isinstance(meta, dict):
                raise self._corrupt(f'version {key} is {_short(meta)}, not an object')
            if meta.get('file', f'head_v{key}.npz') != f'head_v{key}.npz':
                raise self._corrupt(f'version {key} names file {_short(meta.get("file"))}, '
                                    f'not head_v{key}.npz')
            bb = meta.get('backbone')
            if bb is not None and (not isinstance(bb, dict) or bb.get('file') != f'backbone_v{key}.onnx'):
                raise self._corrupt(f'version {key} backbone entry {_short(bb)} does not name '
                                    f'backbone_v{key}.onnx')
        cur, acc = obj.get('current'), obj.get('accepted')
        if not _is_int(cur, 0, MAX_VERSION) or (cur and str(cur) not in versions):
            raise self._corrupt(f'"current" must be 0 or a registered version, got {_short(cur)}')
        if not isinstance(acc, list) or not all(_is_int(v, 0, MAX_VERSION) for v in acc):
            raise self._corrupt(f'"accepted" must be a list of versions, got {_short(acc)}')
        acc = [0] + [v for v in acc if v and str(v) in versions]
        return {**obj, 'current': cur, 'accepted': acc, 'versions': {k: dict(m) for k, m in versions.items()}}

    def _write_index(self, idx: dict) -> None:
        if len(json.dumps(idx, indent=2, sort_keys=True)) >= MAX_INDEX_BYTES:
            raise BundleError(f'{self.index_path}: the head index would exceed {MAX_INDEX_BYTES} bytes; '
                              'keep fewer versions (keep_versions / keep_head_versions)')
        atomic_write_json(self.index_path, idx)

    def index(self) -> dict:
        return self._read_index()

    @property
    def current_version(self) -> int:
        return self._read_index()['current']

    def versions(self) -> list[int]:
        return [0] + sorted(int(v) for v in self._read_index()['versions'])

    def path_of(self, version: int) -> Path:
        if version == 0:
            return self.bundle.files['head']
        return self.dir / f'head_v{version}.npz'

    def backbone_path_of(self, version: int) -> Path:
        return self.dir / f'backbone_v{version}.onnx'

    def load(self, version: int | None = None, with_backbone: bool = False):
        """Load a version (default: current) and validate it against the bundle; with ``with_backbone``,
        ``(head, backbone bytes or None)``."""
        return self._load_from(self._read_index(), version, with_backbone)

    def _load_backbone(self, version: int, meta: dict) -> bytes | None:
        bb = meta.get('backbone')
        if bb is None:
            return None
        return _read_verified(self.backbone_path_of(version), bb.get('sha256'),
                              backbone_max_bytes(self.bundle), f'backbone of version {version}')

    def _load_from(self, idx: dict, version, with_backbone: bool = False):
        version = _as_version(idx['current'] if version is None else version)
        if version == 0:
            return (self.bundle.head, None) if with_backbone else self.bundle.head
        meta = idx['versions'].get(str(version))
        if meta is None:
            raise BundleError(f'head version {version} is not registered in {self.index_path}')
        p = self.path_of(version)
        bound = head_max_bytes(self.bundle.feature_size)
        data = _read_verified(p, meta.get('sha256'), npz_file_bound(bound), f'head version {version}')
        head = Head.load(p, version=version, max_bytes=bound, data=data)
        self.check_compatible(head)
        backbone = self._load_backbone(version, meta)  # verified even when not asked for: a pair or nothing
        return (head, backbone) if with_backbone else head

    def check_compatible(self, head: Head) -> None:
        base = self.bundle.class_names
        if head.feature_size != self.bundle.feature_size:
            raise BundleError(f'head v{head.version} expects {head.feature_size} features, the backbone '
                              f'gives {self.bundle.feature_size}')
        if head.class_names[:len(base)] != base:
            raise BundleError(f'head v{head.version} class names do not start with the bundle\'s '
                              f'{len(base)} classes')

    @staticmethod
    def _rollback_target(idx: dict) -> int | None:
        acc, cur = idx['accepted'], idx['current']
        pos = acc.index(cur) if cur in acc else len(acc)
        return acc[pos - 1] if pos else None

    def load_current_or_fallback(self, with_backbone: bool = False) -> tuple:
        """The current head; if it is unusable, the previous accepted versions in turn, else the bundle head.

        Never raises. Returns ``(head, warning)``, with ``with_backbone`` ``(head, backbone, warning)``; the
        warning explains a fallback (None if none was needed). A version whose backbone file is damaged is
        unusable as a whole. The index is read once (linear in the number of versions tried).
        """
        if with_backbone:
            try:
                idx = self._read_index()
            except BundleError as e:
                return self.bundle.head, None, f'{e}; using the bundle head (v0)'
            (head, backbone), warn = self._first_usable(idx)
            return head, backbone, warn
        head_backbone, warn = self._first_usable(None)
        return head_backbone[0], warn

    def _first_usable(self, idx: dict | None) -> tuple[tuple, str | None]:
        if idx is None:
            try:
                idx = self._read_index()
            except BundleError as e:
                return (self.bundle.head, None), f'{e}; using the bundle head (v0)'
        acc, cur = idx['accepted'], idx['current']
        pos = acc.index(cur) if cur in acc else len(acc)
        first_error = None
        for v in dict.fromkeys([cur, *reversed(acc[:pos]), 0]):
            try:
                pair = self._load_from(idx, v, with_backbone=True)
            except BundleError as e:
                first_error = first_error or str(e)
                continue
            return pair, None if first_error is None else f'head v{cur} unusable ({first_error}), using v{v}'
        return (self.bundle.head, None), 'no usable adapted head, using the bundle head (v0)'

    @contextlib.contextmanager
    def _locked(self):
        """Serialise read-modify-write of ``index.json`` across threads and processes (``flock`` on
        ``heads/.lock``; released by the kernel if the holder dies). Without a writable directory there
        is nothing to serialise: the write that follows fails with the real error. The lock file is never
        followed through a symlink (BundleError), so nothing is created outside the state directory."""
        lock = self.dir / '.lock'
        with contextlib.suppress(OSError):
            self.dir.mkdir(parents=True, exist_ok=True)
        fd = None
        for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
            try:
                fd = os.open(lock, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
                break
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise BundleError(f'{lock} is a symbolic link; refusing to follow it (remove it)') from e
        try:
            if fd is not None:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise BundleError(f'{lock} is not a regular file (remove it)')
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            if fd is not None:
                os.close(fd)  # releases the lock

    def add(self, head: Head, metrics: dict | None = None, activate: bool = True,
            backbone: bytes | None = None) -> Head:
        """Write ``head`` as the next version (atomic), register it, and make it current; then apply
        retention (``keep_versions``). ``backbone``: serialised ONNX the head's features come from (the
        bundle's backbone with re-estimated statistics), stored as ``backbone_v<N>.onnx`` with the version.

        Safe against concurrent writers (threads or processes) and write failures (ENOSPC, EROFS, ...):
        on any error the index and the current head are unchanged and no new file is left behind.
        """
        self.check_compatible(head)
        with self._locked():
            idx = self._read_index()
            version = max([0] + [int(v) for v in idx['versions']]) + 1
            head = Head(head.weight, head.bias, head.class_names, version)
            p = self.path_of(version)
            data = head.to_bytes()
            written = []
            meta = {'file': p.name, 'sha256': hashlib.sha256(data).hexdigest(), 'created': time.time(),
                    'metrics': metrics or {}, 'num_classes': head.num_classes}
            try:
                if backbone is not None:
                    bp = self.backbone_path_of(version)
                    if len(backbone) > backbone_max_bytes(self.bundle):
                        raise BundleError(f'backbone of {len(backbone)} bytes is larger than the bound '
                                          f'{backbone_max_bytes(self.bundle)} for bundle {self.bundle.name}')
                    atomic_write_bytes(bp, backbone)
                    written.append(bp)
                    meta['backbone'] = {'file': bp.name, 'sha256': hashlib.sha256(backbone).hexdigest()}
                atomic_write_bytes(p, data)
                written.append(p)
            except BaseException:
                for f in written:
                    with contextlib.suppress(OSError):
                        f.unlink()
                raise
            idx['versions'][str(version)] = meta
            if activate:
                idx['accepted'].append(version)
                idx['current'] = version
            doomed = self._prune(idx, version) if self.keep_versions else []
            try:
                self._write_index(idx)
            except BaseException:
                for f in written:  # not registered: do not leave orphan version files behind
                    with contextlib.suppress(OSError):
                        f.unlink()
                raise
            for v in doomed:  # unregistered now: a crash before the unlink leaves a stray, removed later
                for f in (self.path_of(v), self.backbone_path_of(v)):
                    with contextlib.suppress(OSError):
                        f.unlink()
            if self.keep_versions:
                self._remove_strays(idx)
        return head

    def _prune(self, idx: dict, new_version: int) -> list[int]:
        """Drop the oldest registered versions beyond ``keep_versions`` from ``idx``; return them."""
        registered = sorted(int(v) for v in idx['versions'])
        keep = {*registered[-self.keep_versions:], idx['current'], self._rollback_target(idx), new_version}
        doomed = [v for v in registered if v not in keep]
        for v in doomed:
            del idx['versions'][str(v)]
        gone = set(doomed)
        idx['accepted'] = [v for v in idx['accepted'] if v not in gone]
        return doomed

    def _remove_strays(self, idx: dict) -> None:
        """Unregistered ``head_v<N>.npz`` and temp files older than STRAY_AGE_S (called under the lock,
        so no writer of ours is between writing such a file and registering it)."""
        now = time.time()
        try:
            entries = list(os.scandir(self.dir))
        except OSError:
            return
        for e in entries:
            m = _STRAY.fullmatch(e.name)
            if m is None or ((m['v'] or m['w']) and (m['v'] or m['w']) in idx['versions']):
                continue
            with contextlib.suppress(OSError):
                old = now - e.stat(follow_symlinks=False).st_mtime > STRAY_AGE_S
                if old and e.is_file(follow_symlinks=False):
                    os.unlink(e.path)

    def activate(self, version: int) -> Head:
        """Make a registered version current (validating it first)."""
        with self._locked():
            idx = self._read_index()
            head = self._load_from(idx, version)
            if head.version not in idx['accepted']:
                idx['accepted'].append(head.version)
            idx['current'] = head.version
            self._write_index(idx)
        return head

    def rollback(self, with_backbone: bool = False):
        """Return to the previous accepted version (with ``with_backbone``: ``(head, backbone or None)``).
        Raises BundleError if already at the first one."""
        with self._locked():
            idx = self._read_index()
            acc = idx['accepted']
            cur = idx['current']
            pos = acc.index(cur) if cur in acc else len(acc)
            if pos == 0:
                raise BundleError('already at the first accepted head (v0); nothing to roll back to')
            prev = acc[pos - 1]
            head, backbone = self._load_from(idx, prev, with_backbone=True)
            idx['accepted'] = acc[:pos]
            idx['current'] = prev
            self._write_index(idx)
        return (head, backbone) if with_backbone else head


def _read_verified(path: Path, want, limit: int, what: str) -> bytes:
    """The bytes of a registry file whose sha256 (required, from the index) is checked before anything
    parses them; BundleError naming ``what`` otherwise."""
    if not isinstance(want, str) or not _SHA256.fullmatch(want):
        raise BundleError(f'{what}: the index has no valid sha256 for it (required)')
    try:
        data = read_bounded(path, limit)
    except FileNotFoundError as e:
        raise BundleError(f'{what}: file {path} is missing') from e
    except (OSError, ValueError) as e:
        raise BundleError(f'{what}: {e}') from e
    if hashlib.sha256(data).hexdigest() != want:
        raise BundleError(f'{what}: sha256 mismatch, {path} is corrupt')
    return data


def default_model_path(name: str = 'gtsrb_student') -> Path:
    """A shipped bundle: ``share/edge_tl_ros/models/<name>`` when installed with colcon, else the repo's."""
    try:
        from ament_index_python.packages import get_package_share_directory

        p = Path(get_package_share_directory('edge_tl_ros')) / 'models' / name
        if p.is_dir():
            return p
    except Exception:  # not installed through ament (pip/editable checkout): use the source tree
        pass
    return Path(__file__).resolve().parent.parent / 'models' / name


def resolve_bundle_path(value: str, default_name: str = 'gtsrb_student') -> Path:
    """A bundle parameter: ``""`` = the shipped default, a bare name = a shipped bundle, else a path."""
    value = (value or '').strip()
    if not value:
        return default_model_path(default_name)
    if '/' not in value and not Path(value).exists():
        return default_model_path(value)
    return Path(value).expanduser()


def default_state_dir(bundle_name: str) -> Path:
    """Where adapted heads and the frame store live on the robot (``$ROS_HOME`` or ``~/.ros``)."""
    ros_home = os.environ.get('ROS_HOME') or os.path.join(os.path.expanduser('~'), '.ros')
    return Path(ros_home) / 'edge_tl_ros' / bundle_name


def resolve_teacher(value: str, student: ModelBundle) -> tuple[Path | None, str]:
    """The ``teacher_bundle`` parameter -> (bundle path or None, how it was chosen).

    ``"auto"`` = the teacher the student was distilled from (its manifest's ``distillation.teacher.bundle``)
    when it is installed beside the student or shipped; ``""`` = no teacher; else as
    :func:`resolve_bundle_path`.
    """
    value = (value or '').strip()
    if not value:
        return None, 'no teacher (teacher_bundle "")'
    if value != 'auto':
        return resolve_bundle_path(value), f'teacher {value}'
    dist = student.manifest.get('distillation')
    teacher = dist.get('teacher') if isinstance(dist, dict) else None
    name = teacher.get('bundle') if isinstance(teacher, dict) else None
    if not isinstance(name, str) or not name.strip() or '/' in name or name.startswith('.'):
        return None, f'no teacher: {student.name} names none it was distilled from (teacher_bundle auto)'
    for cand in (student.root.parent / name, default_model_path(name)):
        if (cand / 'manifest.yaml').is_file():
            return cand, f'teacher {name}, the one {student.name} was distilled from (teacher_bundle auto)'
    return None, (f'no teacher: {student.name} was distilled from {name}, which is not installed '
                  '(teacher_bundle auto)')
