"""Crash-safe file writes (write to a temporary file in the same directory, fsync, rename) and bounded
reads: :func:`read_bounded` and :func:`load_npz` check a file's type and size before reading it, so a FIFO,
a huge file or a zip bomb is refused without blocking or allocating."""

from __future__ import annotations

import errno
import io
import json
import math
import os
import re
import stat
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see either the old file or the complete new one.

    A crash (or ENOSPC) leaves at most a ``.tmp`` file behind, never a half-written ``path``. The file
    gets the permissions a plain ``open(path, 'wb')`` would give it (an existing file's mode, else
    0666 minus the umask), not the private 0600 of the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _target_mode(path)
    fd, tmp = tempfile.mkstemp(prefix='.' + path.name + '.', suffix='.tmp', dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def _target_mode(path: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    # read, not os.umask(): setting it to probe is process-wide and races with other threads' file creation
    try:
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith('Umask:'):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _fsync_dir(directory: Path) -> None:
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + '\n').encode())


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """Serialise arrays as an (uncompressed) ``.npz`` in memory; never uses pickle."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return buf.getvalue()


NPZ_MAX_BYTES = 256 << 20  # default bound on the total inflated size of an .npz's arrays
NPZ_MAX_MEMBERS = 64
_MEMBER = re.compile(r'[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\.npy')


class ReadRefused(ValueError):
    """A file refused before reading it; ``reason`` is ``not_regular`` or ``too_large``."""

    def __init__(self, path, reason: str, detail: str):
        super().__init__(f'{path}: {detail}')
        self.reason = reason


def _open_regular(path: str | os.PathLike, max_bytes: int, follow_symlinks: bool = True):
    """``path`` opened for reading (binary) after checking it is a regular file of at most ``max_bytes``
    bytes (never blocks on a FIFO; with ``follow_symlinks=False`` a symlink is refused, not followed).
    OSError if it cannot be opened, :class:`ReadRefused` if it is not acceptable."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as e:  # ELOOP: a symlink (O_NOFOLLOW); ENXIO: a socket
        if e.errno in (errno.ELOOP, errno.ENXIO):
            raise ReadRefused(path, 'not_regular', 'not a regular file') from e
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ReadRefused(path, 'not_regular', 'not a regular file')
        if st.st_size > max_bytes:
            raise ReadRefused(path, 'too_large', f'{st.st_size} bytes, more than the {max_bytes} allowed')
        return os.fdopen(fd, 'rb')
    except BaseException:
        os.close(fd)
        raise


def read_bounded(path: str | os.PathLike, max_bytes: int, follow_symlinks: bool = True) -> bytes:
    """The bytes of the regular file ``path`` if it holds at most ``max_bytes`` (else ReadRefused)."""
    with _open_regular(path, max_bytes, follow_symlinks) as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(size + 1)  # what fstat saw, +1 to notice growth (read(n) allocates n bytes at once)
    if len(data) > size:  # grew after the check (files written here are replaced by rename, never grown)
        raise ReadRefused(path, 'too_large', f'grew while being read (more than {size} bytes)')
    return data


class _Refused(ValueError):
    pass


def npz_file_bound(max_bytes: int) -> int:
    """The largest .npz file whose arrays inflate to at most ``max_bytes``."""
    # stored members take their size plus headers; deflate can grow incompressible data by ~0.03 %
    return max_bytes + max_bytes // 512 + (1 << 20)


def load_npz(path: str | os.PathLike, max_bytes: int = NPZ_MAX_BYTES, max_members: int = NPZ_MAX_MEMBERS,
             data: bytes | None = None, keys=None) -> dict[str, np.ndarray]:
    """Load an ``.npz`` (from ``path``, or from ``data`` read from it) with pickle disabled; only the
    arrays ``keys`` (all of which must be there) when given, else every array.

    Checked before anything is inflated or allocated: at most ``max_members`` members, each a plain
    ``<name>.npy`` (no directories), stored or deflated (no other compression, no encryption), their total
    inflated size (from the zip directory, which ``zipfile`` enforces while inflating) at most
    ``max_bytes``, and each ``.npy`` header's shape x itemsize equal to its member's size (so a header
    claiming terabytes allocates nothing). Deflate cannot exceed ~1032:1, so the total bound also bounds the
    work. Raises ValueError naming the path on any problem.
    """
    try:
        if data is None:
            f = _open_regular(path, npz_file_bound(max_bytes))
        elif len(data) > npz_file_bound(max_bytes):
            raise _Refused(f'{len(data)} bytes, more than the {npz_file_bound(max_bytes)} allowed')
        else:
            f = io.BytesIO(data)
        with f:
            return _read_npz(f, max_bytes, max_members, keys)
    except _Refused as e:
        raise ValueError(f'{path}: refused npz file: {e}') from e
    except ValueError as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f'{path}: not a valid npz file ({e.__class__.__name__}: {e})') from e
    except Exception as e:  # zipfile.BadZipFile, EOFError, OSError, ...
        raise ValueError(f'{path}: not a valid npz file ({e.__class__.__name__}: {e})') from e


def _read_npz(f, max_bytes: int, max_members: int, keys=None) -> dict[str, np.ndarray]:
    size = f.seek(0, os.SEEK_END)
    tail = min(size, 22 + 65535)  # the end-of-central-directory record, found like zipfile finds it
    f.seek(size - tail)
    buf = f.read(tail)
    i = buf.rfind(b'PK\x05\x06')
    if i >= 0 and len(buf) - i >= 22:
        count, cd_size = struct.unpack('<HL', buf[i + 10:i + 16])
        if count > max_members or cd_size > max_members * 1024:
            raise _Refused(f'zip directory of {count} members / {cd_size} bytes (at most {max_members} '
                           'arrays allowed)')
    f.seek(0)
    with zipfile.ZipFile(f) as zf:
        infos = zf.infolist()
        if len(infos) > max_members:
            raise _Refused(f'{len(infos)} members, more than {max_members}')
        total = sum(info.file_size for info in infos)
        if total > max_bytes:
            raise _Refused(f'its arrays would inflate to {total} bytes, more than the {max_bytes} allowed')
        out = {}
        for info in infos:
            name = info.filename
            if not _MEMBER.fullmatch(name) or name[:-4] in out:
                raise _Refused(f'member {name[:80]!r} is not a plain, unique <name>.npy array')
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or info.flag_bits & 1:
                raise _Refused(f'member {name!r} is encrypted or uses compression {info.compress_type}')
            if keys is not None and name[:-4] not in keys:
                out[name[:-4]] = None  # checked, not read
                continue
            with zf.open(info) as m:
                version = np.lib.format.read_magic(m)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(m)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(m)
                else:
                    raise _Refused(f'member {name!r}: unsupported .npy format {version}')
                if dtype.hasobject:
                    raise _Refused(f'member {name!r} holds Python objects; not loaded (allow_pickle=False)')
                nbytes = math.prod(shape) * dtype.itemsize
                if min(shape, default=0) < 0 or m.tell() + nbytes != info.file_size:
                    raise _Refused(f'member {name!r}: header says shape {shape} of {dtype} ({nbytes} bytes), '
                                   f'the member holds {info.file_size - m.tell()}')
            with zf.open(info) as m:
                out[name[:-4]] = np.lib.format.read_array(m, allow_pickle=False)
        if keys is not None:
            missing = [k for k in keys if k not in out]
            if missing:
                raise _Refused(f'no array {missing[0]!r}')
            return {k: out[k] for k in keys}
        return out
