"""The model bundle: the one on-disk format shared by training, perception and adaptation.

A bundle is a directory ``models/<name>/``::

    manifest.yaml      format_version, task, class_names, input (size, colour order, normalisation),
                       feature_size, files, sha256 of every file, metrics (+ the data they came from),
                       creation command
    backbone.onnx      image [N,3,H,W] float32 (normalised) -> features [N,D] float32
    head.npz           weight [C,D] float32, bias [C] float32, class_names [C] str   (head version 0)
    full.onnx          optional: backbone + head fused, image -> logits [N,C]
    backbone.int8.onnx optional: statically quantised backbone (QDQ), used when it pays
    anchor.npz         optional: source-domain anchor set, features [M,D] + labels [M] (no images)

Head versions written on the robot (by the adaptation node) live in a *state directory*, not in the
(possibly read-only, installed) bundle: ``<state_dir>/heads/head_v<N>.npz`` plus ``index.json``; see
:class:`HeadRegistry`. ``load_bundle`` validates everything and raises :class:`BundleError` with one
clear message on any mismatch.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from .atomic import atomic_write_bytes, atomic_write_json, load_npz, npz_bytes

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
COLOR_ORDERS = ('rgb', 'bgr')


class BundleError(ValueError):
    """A model bundle or head file is missing, corrupt, or inconsistent with its manifest."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Head:
    """A linear classifier on backbone features: ``logits = features @ weight.T + bias``.

    Immutable, so the perception node can swap the whole object with one reference assignment.
    """

    weight: np.ndarray  # [C, D] float32
    bias: np.ndarray  # [C] float32
    class_names: tuple[str, ...]
    version: int = 0

    def __post_init__(self):
        w = np.ascontiguousarray(self.weight, dtype=np.float32)
        b = np.ascontiguousarray(self.bias, dtype=np.float32).reshape(-1)
        if w.ndim != 2:
            raise BundleError(f'head weight must be 2-D [classes, features], got shape {w.shape}')
        if b.shape[0] != w.shape[0] or len(self.class_names) != w.shape[0]:
            raise BundleError(
                f'head has {w.shape[0]} weight rows, {b.shape[0]} biases and '
                f'{len(self.class_names)} class names; they must agree')
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise BundleError('head contains NaN or Inf')
        w.setflags(write=False)
        b.setflags(write=False)
        object.__setattr__(self, 'weight', w)
        object.__setattr__(self, 'bias', b)
        object.__setattr__(self, 'class_names', tuple(str(c) for c in self.class_names))

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
    def load(cls, path: str | os.PathLike, version: int | None = None) -> 'Head':
        path = Path(path)
        if not path.is_file():
            raise BundleError(f'head file not found: {path}')
        with open(path, 'rb') as f:
            magic = f.read(4)
        if magic != b'PK\x03\x04':
            raise BundleError(f'{path}: not an npz head file (refusing to unpickle or guess the format)')
        try:
            z = load_npz(path)
        except ValueError as e:
            raise BundleError(str(e)) from e
        missing = {'weight', 'bias', 'class_names'} - set(z)
        if missing:
            raise BundleError(f'{path}: head file lacks {sorted(missing)}')
        if version is None:
            version = int(z['version']) if 'version' in z else 0
        try:
            return cls(z['weight'], z['bias'], tuple(z['class_names'].tolist()), version)
        except BundleError as e:
            raise BundleError(f'{path}: {e}') from e


@dataclass
class ModelBundle:
    """A validated bundle directory; see the module docstring for the layout."""

    root: Path
    manifest: dict
    head: Head
    anchor: tuple[np.ndarray, np.ndarray] | None = None
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


def read_manifest(root: str | os.PathLike) -> dict:
    root = Path(root)
    mpath = root / 'manifest.yaml'
    if not root.is_dir():
        raise BundleError(f'model bundle directory not found: {root}')
    if not mpath.is_file():
        raise BundleError(f'{root}: no manifest.yaml (is this a model bundle directory?)')
    try:
        manifest = yaml.safe_load(mpath.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f' at line {mark.line + 1}, column {mark.column + 1}' if mark is not None else ''
        raise BundleError(f'{mpath}: invalid YAML{where}: {getattr(e, "problem", None) or e}') from e
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f'{mpath}: cannot read the manifest ({type(e).__name__}: {e})') from e
    if not isinstance(manifest, dict):
        raise BundleError(f'{mpath}: manifest must be a mapping')
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f'{mpath}: missing keys {missing}')
    if manifest['format_version'] not in SUPPORTED_FORMAT_VERSIONS:
        raise BundleError(
            f'{mpath}: manifest format_version {manifest["format_version"]!r} is not supported by this '
            f'edge_tl_ros (supports {list(SUPPORTED_FORMAT_VERSIONS)}); re-export the bundle or upgrade')
    inp = manifest['input']
    for k in ('height', 'width', 'color_order', 'mean', 'std'):
        if k not in inp:
            raise BundleError(f'{mpath}: input.{k} missing')
    if inp['color_order'] not in COLOR_ORDERS:
        raise BundleError(f'{mpath}: input.color_order must be one of {COLOR_ORDERS}')
    if len(inp['mean']) != 3 or len(inp['std']) != 3 or min(inp['std']) <= 0:
        raise BundleError(f'{mpath}: input.mean/std must be 3 values, std > 0')
    for k in ('backbone', 'head'):
        if k not in manifest['files']:
            raise BundleError(f'{mpath}: files.{k} missing')
    return manifest


def load_bundle(root: str | os.PathLike, verify_hashes: bool = True, check_onnx: bool = True) -> ModelBundle:
    """Load and validate a bundle. Raises :class:`BundleError` with a clear message on any problem."""
    root = Path(root).expanduser()
    manifest = read_manifest(root)
    files = {}
    for key, rel in manifest['files'].items():
        p = root / rel
        if not p.is_file():
            raise BundleError(f'{root}: file {rel!r} ({key}) listed in manifest.yaml is missing')
        files[key] = p
        if verify_hashes:
            want = manifest['sha256'].get(rel)
            if want is None:
                raise BundleError(f'{root}: manifest.yaml has no sha256 for {rel!r}')
            got = sha256_file(p)
            if got != want:
                raise BundleError(
                    f'{root}: sha256 mismatch for {rel!r} (manifest {want[:12]}..., file {got[:12]}...); '
                    'the file is corrupt or was replaced')
    head = Head.load(files['head'], version=0)
    classes = tuple(manifest['class_names'])
    if head.class_names != classes:
        raise BundleError(f'{root}: head has {head.num_classes} classes {list(head.class_names)[:5]}..., '
                          f'manifest lists {len(classes)}; they must match')
    if head.feature_size != int(manifest['feature_size']):
        raise BundleError(f'{root}: head expects {head.feature_size} features, manifest feature_size is '
                          f'{manifest["feature_size"]}')
    anchor = None
    if 'anchor' in files:
        z = _load_npz_checked(files['anchor'])
        if 'features' not in z or 'labels' not in z:
            raise BundleError(f'{files["anchor"]}: anchor set needs arrays features and labels')
        feats, labels = z['features'].astype(np.float32), z['labels'].astype(np.int64)
        if feats.ndim != 2 or feats.shape[1] != head.feature_size or len(labels) != len(feats):
            raise BundleError(f'{files["anchor"]}: anchor features {feats.shape} / labels {labels.shape} '
                              f'do not fit feature_size {head.feature_size}')
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise BundleError(f'{files["anchor"]}: anchor labels outside 0..{len(classes) - 1}')
        anchor = (feats, labels)
    bundle = ModelBundle(root=root, manifest=manifest, head=head, anchor=anchor, files=files)
    if check_onnx:
        _check_onnx_shapes(bundle)
    return bundle


def _load_npz_checked(path: Path) -> dict:
    try:
        return load_npz(path)
    except ValueError as e:
        raise BundleError(str(e)) from e


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
                              f'{str(e).splitlines()[0][:200]}') from e
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


class HeadRegistry:
    """Versioned heads of one bundle, kept in ``<state_dir>/heads``.

    Version 0 is the bundle's own ``head.npz``. Each accepted adaptation writes ``head_v<N>.npz``
    (atomically) and appends to ``index.json`` (also atomic): ``{"current": N, "accepted": [0, .., N],
    "versions": {"N": {"file", "sha256", "created", "metrics"}}}``. ``rollback()`` moves ``current`` to
    the previous accepted version. Files are never deleted by rollback, so it can be undone with
    ``activate``.
    """

    def __init__(self, bundle: ModelBundle, state_dir: str | os.PathLike):
        self.bundle = bundle
        self.dir = Path(state_dir).expanduser() / 'heads'
        self.index_path = self.dir / 'index.json'

    # -- index ---------------------------------------------------------------------------------------
    def _read_index(self) -> dict:
        import json

        if not self.index_path.is_file():
            return {'current': 0, 'accepted': [0], 'versions': {}}
        try:
            idx = json.loads(self.index_path.read_text())
            idx['accepted'] = [int(v) for v in idx['accepted']]
            idx['current'] = int(idx['current'])
            return idx
        except (ValueError, KeyError, TypeError) as e:
            raise BundleError(f'{self.index_path}: corrupt head index ({e}); '
                              'delete it to fall back to the bundle head') from e

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

    def load(self, version: int | None = None) -> Head:
        """Load a version (default: current) and validate it against the bundle."""
        idx = self._read_index()
        if version is None:
            version = idx['current']
        if version == 0:
            return self.bundle.head
        meta = idx['versions'].get(str(version))
        if meta is None:
            raise BundleError(f'head version {version} is not registered in {self.index_path}')
        p = self.path_of(version)
        if not p.is_file():
            raise BundleError(f'head version {version}: file {p} is missing')
        if meta.get('sha256') and sha256_file(p) != meta['sha256']:
            raise BundleError(f'head version {version}: sha256 mismatch, {p} is corrupt')
        head = Head.load(p, version=version)
        self.check_compatible(head)
        return head

    def check_compatible(self, head: Head) -> None:
        base = self.bundle.class_names
        if head.feature_size != self.bundle.feature_size:
            raise BundleError(f'head v{head.version} expects {head.feature_size} features, the backbone '
                              f'gives {self.bundle.feature_size}')
        if head.class_names[:len(base)] != base:
            raise BundleError(f'head v{head.version} class names do not start with the bundle\'s '
                              f'{len(base)} classes')

    def load_current_or_fallback(self) -> tuple[Head, str | None]:
        """The current head; if it is unreadable, walk back through accepted versions.

        Returns ``(head, warning)``; the warning explains a fallback (None if none was needed).
        """
        try:
            idx = self._read_index()
        except BundleError as e:
            return self.bundle.head, str(e)
        for v in reversed([v for v in idx['accepted'] if v <= idx['current']] or [0]):
            try:
                head = self.load(v)
                warn = None if v == idx['current'] else f'head v{idx["current"]} unusable, using v{v}'
                return head, warn
            except BundleError:
                continue
        return self.bundle.head, 'no usable adapted head, using the bundle head (v0)'

    @contextlib.contextmanager
    def _locked(self):
        """Serialise read-modify-write of ``index.json`` across threads and processes (``flock`` on
        ``heads/.lock``; released by the kernel if the holder dies). Without a writable directory there
        is nothing to serialise: the write that follows fails with the real error."""
        fd = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir / '.lock', os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            try:
                fd = os.open(self.dir / '.lock', os.O_RDONLY)
            except OSError:
                fd = None
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            if fd is not None:
                os.close(fd)  # releases the lock

    def add(self, head: Head, metrics: dict | None = None, activate: bool = True) -> Head:
        """Write ``head`` as the next version (atomic), register it, and make it current.

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
            atomic_write_bytes(p, data)
            idx['versions'][str(version)] = {
                'file': p.name, 'sha256': hashlib.sha256(data).hexdigest(), 'created': time.time(),
                'metrics': metrics or {}, 'num_classes': head.num_classes}
            if activate:
                idx['accepted'].append(version)
                idx['current'] = version
            try:
                atomic_write_json(self.index_path, idx)
            except BaseException:
                try:  # not registered: do not leave an orphan version file behind
                    p.unlink()
                except OSError:
                    pass
                raise
        return head

    def activate(self, version: int) -> Head:
        """Make a registered version current (validating it first)."""
        with self._locked():
            head = self.load(version)
            idx = self._read_index()
            if version not in idx['accepted']:
                idx['accepted'].append(version)
            idx['current'] = version
            atomic_write_json(self.index_path, idx)
        return head

    def rollback(self) -> Head:
        """Return to the previous accepted version. Raises BundleError if already at the first one."""
        with self._locked():
            idx = self._read_index()
            acc = idx['accepted']
            cur = idx['current']
            pos = acc.index(cur) if cur in acc else len(acc)
            if pos == 0:
                raise BundleError('already at the first accepted head (v0); nothing to roll back to')
            prev = acc[pos - 1]
            head = self.load(prev)
            idx['accepted'] = acc[:pos]
            idx['current'] = prev
            atomic_write_json(self.index_path, idx)
        return head


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
