"""Fuzz tests of the frame store's two boundaries: what is in its directory, and what is in an entry file.

Seeded random generators in bounded loops (no extra dependencies). The expectations are written from the
store's documented rules, not from its code: an unmarked directory is refused (StoreError) as soon as it
holds anything that is not a regular file named like an entry or a store temp file; otherwise the store
opens, its caps hold, nothing outside its directory changes, nothing it did not write is deleted or
followed, and every array it returns is finite and well-formed. Entry files with any content never make
a reader raise; bad ones are skipped (and removed by the owning store at start-up).
"""

import io
import json
import os
import re
import stat
import struct
import threading
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edge_tl_ros.store import MARKER, FrameStore, StoreError, _read

D, C = 8, 3
ENTRY = re.compile(r'^f_([0-9]{20})\.npz$')


def entry(stamp: int) -> str:
    return f'f_{stamp:020d}.npz'


def own_name(name: str) -> bool:
    """A name the store writes: the marker, f'f_{n:020d}.npz' for any int n (older versions wrote negative
    stamps), and atomic_write_bytes' temp names of those."""
    tmp = re.match(r'^\.(.+)\.[A-Za-z0-9_]+\.tmp$', name)
    if tmp:
        return tmp.group(1) == MARKER or own_name(tmp.group(1)) and tmp.group(1).startswith('f_')
    m = re.match(r'^f_(-?[0-9]+)\.npz$', name)
    return name == MARKER or bool(m) and entry(int(m.group(1))) == name


def snapshot(root: Path) -> dict:
    """name -> (type, content: bytes of a regular file, a symlink's target, sorted names of a dir)."""
    out = {}
    for p in root.iterdir():
        st = p.lstat()
        kind = stat.S_IFMT(st.st_mode)
        content = (p.read_bytes() if stat.S_ISREG(st.st_mode) else os.readlink(p) if stat.S_ISLNK(st.st_mode)
                   else sorted(os.listdir(p)) if stat.S_ISDIR(st.st_mode) else None)
        out[p.name] = (kind, content, st.st_mtime_ns if stat.S_ISREG(st.st_mode) else None)
    return out


def in_thread(fn, timeout=60):
    """Run ``fn`` in a daemon thread: a regression that blocks (a FIFO opened for reading) fails."""
    out = {}

    def run():
        try:
            out['value'] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out['error'] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), 'the store blocked (a FIFO or similar was opened)'
    if 'error' in out:
        raise out['error']
    return out['value']


def assert_well_formed(st: FrameStore) -> None:
    for arr in (st.entries(), st.labelled()):
        assert arr.features.dtype == np.float32 and arr.features.ndim == 2
        assert len(arr.features) == len(arr) == len(arr.probs) == len(arr.labels) == len(arr.created)
        assert np.isfinite(arr.features).all() and np.isfinite(arr.conf).all()
        assert np.isfinite(arr.created).all() and (arr.stamps >= 0).all()
        assert all(p.dtype == np.float32 and p.ndim == 1 and np.isfinite(p).all() for p in arr.probs)
        assert all(lab is None or isinstance(lab, str) for lab in arr.labels)
        assert set(arr.stamps.tolist()) <= set(st.stamps())
    crops, found = st.crops(st.stamps())
    assert crops.dtype == np.uint8 and crops.ndim == 4 and len(crops) == len(found)


@pytest.fixture(scope='module')
def template(tmp_path_factory):
    """Valid entry files (name -> bytes) from a real store."""
    st = FrameStore(tmp_path_factory.mktemp('template') / 's', crop_size=(8, 8))
    rng = np.random.default_rng(0)
    for i in range(8):
        st.add(100 + i, rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
               rng.normal(size=D).astype(np.float32), rng.dirichlet(np.ones(C)).astype(np.float32),
               ('red', None)[i % 2], ('topic', '')[i % 2])
    return {p.name: p.read_bytes() for p in st.root.iterdir() if p.name.startswith('f_')}


# -- (a) the store directory ----------------------------------------------------------------------------
MARKERS = [b'{"format": 1}', b'{"format": 1, "x": [1]}', b'', b'\x00\xff garbage', b'{"format": 2}',
           b'{"format": 99}', b'{"format": "1"}', b'{"format": true}', b'[1]', b'{"format": 1.0}', b'null']


def marker_state(root: Path):
    """'ok', 'newer' or None (missing/invalid) -- from the documented marker rules."""
    p = root / MARKER
    if not os.path.lexists(p) or not stat.S_ISREG(p.lstat().st_mode):
        return None
    try:
        fmt = json.loads(p.read_bytes().decode()).get('format')
    except Exception:  # noqa: BLE001
        return None
    if isinstance(fmt, bool) or not isinstance(fmt, int):
        return None
    return 'ok' if fmt == 1 else 'newer' if fmt > 1 else None


def random_name(rng) -> str:
    alphabet = 'abcfnpztm_.-0123456789'
    while True:
        name = ''.join(rng.choice(list(alphabet), int(rng.integers(1, 30))))
        if name not in ('.', '..') and '/' not in name and not own_name(name):
            return name


def populate(rng, root: Path, outside: Path, template: dict) -> None:
    names = sorted(template)
    root.mkdir()
    mk = rng.random()
    if 0.4 <= mk < 0.75:
        (root / MARKER).write_bytes(b'{"format": 1, "written_by": "an older edge_tl_ros"}')
    elif 0.75 <= mk < 0.9:
        (root / MARKER).write_bytes(MARKERS[int(rng.integers(len(MARKERS)))])
    elif mk >= 0.9:
        [lambda: (root / MARKER).mkdir(), lambda: os.mkfifo(root / MARKER),
         lambda: (root / MARKER).symlink_to(outside / 'marker')][int(rng.integers(3))]()
    own_kinds = ['valid', 'valid', 'valid', 'truncated', 'bitflip', 'renamed', 'tmp_stale', 'tmp_fresh',
                 'legacy']
    kinds = own_kinds + ['foreign', 'fifo', 'symlink', 'dangling', 'subdir', 'foreign_tmp']
    hostile = rng.random() < 0.6
    for _ in range(int(rng.integers(0, 14))):
        kind = rng.choice(kinds if hostile else own_kinds)
        src = names[int(rng.integers(len(names)))]
        data = template[src]
        stamp = int(rng.integers(0, 10**6))
        other = [entry(stamp), f'.{entry(stamp)}.z{stamp}.tmp', entry(-stamp - 1),
                 random_name(rng)][int(rng.integers(4))]
        name = {'valid': src, 'truncated': src, 'bitflip': src, 'renamed': entry(stamp),
                'legacy': entry(-1 - stamp),
                'foreign': random_name(rng), 'foreign_tmp': random_name(rng) + '.tmp',
                'tmp_stale': f'.{entry(stamp)}.x{stamp}_q.tmp', 'tmp_fresh': f'.{entry(stamp)}.y{stamp}.tmp'
                        }.get(kind, other)
        p = root / name
        if os.path.lexists(p) or (kind in ('foreign', 'foreign_tmp') and own_name(name)):
            continue
        if kind in ('valid', 'renamed', 'legacy'):
            p.write_bytes(data)
        elif kind == 'truncated':
            p.write_bytes(data[:int(rng.integers(0, len(data)))])
        elif kind == 'bitflip':
            b = bytearray(data)
            for i in rng.integers(0, len(b), int(rng.integers(1, 8))):
                b[i] ^= 1 << int(rng.integers(8))
            p.write_bytes(bytes(b))
        elif kind in ('foreign', 'foreign_tmp', 'tmp_fresh'):
            p.write_bytes(rng.bytes(int(rng.integers(0, 64))))
        elif kind == 'tmp_stale':
            p.write_bytes(b'half')
            os.utime(p, (1e9, 1e9))
        elif kind == 'fifo':
            os.mkfifo(p)
        elif kind == 'symlink':
            p.symlink_to(outside / rng.choice(sorted(os.listdir(outside))))
        elif kind == 'dangling':
            p.symlink_to(outside / 'does-not-exist')
        elif kind == 'subdir':
            p.mkdir()
            (p / 'inside').write_bytes(data)


def test_fuzz_store_directory(tmp_path, template):
    entry_size = max(len(v) for v in template.values())
    outcomes = {'refused': 0, 'opened': 0, 'adopted': 0, 'opened_with_foreign': 0}
    for it in range(40):
        rng = np.random.default_rng(1000 + it)
        outside = tmp_path / f'outside{it}'
        outside.mkdir()
        (outside / 'valid.npz').write_bytes(template[sorted(template)[0]])  # following it would "work"
        (outside / 'marker').write_bytes(b'{"format": 1}')
        (outside / 'data').write_bytes(b'user data')
        root = tmp_path / f'store{it}'
        populate(rng, root, outside, template)
        before, outside_before = snapshot(root), snapshot(outside)
        not_ours = {n: v for n, v in before.items() if not (stat.S_ISREG(v[0]) and own_name(n))}
        mstate = marker_state(root)
        expect_error = mstate == 'newer' or (mstate is None and bool(not_ours))
        caps = dict(max_entries=int(rng.integers(1, 9)), max_bytes=int(entry_size * rng.uniform(1, 10)))
        msg = f'iteration {it}: {sorted(before)} marker={mstate}'

        # a round's worker: any directory, nothing changes
        ro = in_thread(lambda: FrameStore(root, readonly=True, **caps))
        assert_well_formed(ro)
        assert snapshot(root) == before, msg

        if expect_error:
            with pytest.raises(StoreError, match='did not write|newer'):
                in_thread(lambda: FrameStore(root, **caps))
            assert snapshot(root) == before, msg
            outcomes['refused'] += 1
        else:
            st = in_thread(lambda: FrameStore(root, **caps))
            outcomes['opened'] += 1
            outcomes['adopted'] += mstate is None
            outcomes['opened_with_foreign'] += bool(not_ours)
            assert len(st) <= caps['max_entries'] and st.total_bytes <= caps['max_bytes'], msg
            assert sum((root / entry(s)).stat().st_size for s in st.stamps()) <= caps['max_bytes']
            valid_placed = {n for n in before if n in template and before[n][1] == template[n]}
            assert len(valid_placed - {entry(s) for s in st.stamps()}) <= st.evicted, msg  # none lost
            assert marker_state(root) == 'ok', msg
            now = snapshot(root)  # legacy negative-stamp files (ours, unusable) are gone
            assert not [n for n, v in now.items() if stat.S_ISREG(v[0]) and n.startswith('f_-')], msg
            assert_well_formed(st)
            for n, v in not_ours.items():
                if n != MARKER:  # an invalid regular marker is rewritten
                    assert snapshot(root).get(n) == v, (msg, n)
            assert st.wipe() >= 0 and st.remaining_entries() == 0, msg
            after = snapshot(root)
            assert all(after.get(n) == v for n, v in not_ours.items() if n != MARKER), msg
            assert MARKER in after and len(st) == 0
        assert snapshot(outside) == outside_before, msg
    assert min(outcomes.values()) >= 5, outcomes  # every branch exercised


# -- (b) entry files --------------------------------------------------------------------------------------
FRAGMENTS = ['1e400', '-1e400', 'NaN', 'Infinity', '-Infinity', '[1, 2]', '{}', 'null', 'true', 'false',
             '""', '"red"', '"topic"', '"teacher"', '"oracle"', '0', '-1', '7', '1.5', str(2**63),
             str(10**30), '"\\ud800"', '"' + 'x' * 70_000 + '"', '"' + 'y' * 2000 + '"',
             '[' * 20_000 + ']' * 20_000]
DTYPES = [np.float64, np.float16, np.int32, np.int64, np.uint8, np.int8, bool, np.complex64, '>f4', '<U3']


def huge_png() -> bytes:
    ihdr = struct.pack('>IIBBBBB', 100_000, 100_000, 8, 2, 0, 0, 0)
    return b'\x89PNG\r\n\x1a\n' + struct.pack('>I', 13) + b'IHDR' + ihdr + b'\0\0\0\0'


def meta_text(meta: dict, rng) -> str:
    parts = {k: json.dumps(v) for k, v in meta.items()}
    for _ in range(int(rng.integers(1, 3))):
        op = rng.integers(3)
        key = rng.choice(sorted(parts) + ['extra'])
        if op == 0:
            parts[key] = FRAGMENTS[int(rng.integers(len(FRAGMENTS)))]
        elif op == 1:
            parts.pop(key, None)
        else:
            return rng.choice(['[]', '"meta"', '5', 'null', '{"stamp": ', '{}'])
    return '{' + ', '.join(f'{json.dumps(k)}: {v}' for k, v in parts.items()) + '}'


def mutate(rng, arrays: dict, meta: dict) -> bool:
    """Apply one random mutation to ``arrays`` in place; True if it made an object (pickled) array."""
    op = rng.choice(['drop', 'extra', 'dtype', 'shape', 'nonfinite', 'meta', 'meta_bytes', 'crop',
                     'object', 'big_meta'])
    key = rng.choice(['meta', 'features', 'probs', 'crop'])
    if op == 'drop':
        arrays.pop(key, None)
    elif op == 'extra':
        arrays[str(rng.choice(['x', 'meta2', 'features.npy']))] = rng.normal(size=3)
    elif op == 'dtype' and key in arrays:
        arrays[key] = arrays[key].astype(DTYPES[int(rng.integers(len(DTYPES)))])
    elif op == 'shape' and key in arrays:
        a = arrays[key]
        arrays[key] = [a.reshape(1, -1), a[:0], a.reshape(-1)[:1].reshape(()) if a.size else a,
                       np.tile(a, (2, 1))][int(rng.integers(4))]
    elif op == 'nonfinite':
        k = rng.choice(['features', 'probs'])
        if k in arrays and arrays[k].dtype.kind == 'f' and arrays[k].size:
            arrays[k].flat[int(rng.integers(arrays[k].size))] = rng.choice([np.nan, np.inf, -np.inf])
    elif op == 'meta':
        arrays['meta'] = np.frombuffer(meta_text(meta, rng).encode(), np.uint8)
    elif op == 'meta_bytes':
        arrays['meta'] = np.frombuffer(rng.bytes(int(rng.integers(0, 50))), np.uint8)
    elif op == 'crop':
        arrays['crop'] = np.frombuffer([huge_png(), rng.bytes(40), b''][int(rng.integers(3))], np.uint8)
    elif op == 'object':
        arrays[key] = np.array([{'a': 1}, 'x'], dtype=object)
        return True
    elif op == 'big_meta':
        arrays['meta'] = np.frombuffer(json.dumps(dict(meta, label='z' * 100_000)).encode(), np.uint8)
    return False


def random_entry(rng, stamp: int, template_arrays: dict) -> tuple[bytes, bool]:
    """(file bytes, untouched): a valid entry with 0..3 random mutations of its content."""
    arrays = {k: v.copy() for k, v in template_arrays.items()}
    meta = dict(json.loads(arrays['meta'].tobytes()), stamp=stamp)
    arrays['meta'] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    n = int(rng.choice([0, 0, 1, 1, 2, 3]))
    pickled = False
    for _ in range(n):
        try:  # a mutation that does not apply to this entry (e.g. a dtype cast of an object array) is skipped
            with np.errstate(all='ignore'), warnings.catch_warnings():
                warnings.simplefilter('ignore')  # lossy casts are the point
                pickled = mutate(rng, arrays, meta) or pickled
        except (TypeError, ValueError, IndexError):
            pass
    buf = io.BytesIO()
    (np.savez_compressed if rng.random() < 0.2 else np.savez)(buf, **arrays)
    data = buf.getvalue()
    file_op = rng.integers(8)
    if file_op == 0:
        data = data[:int(rng.integers(0, len(data)))]
    elif file_op == 1:
        b = bytearray(data)
        b[int(rng.integers(len(b)))] ^= 0xFF
        data = bytes(b)
    elif file_op == 2:
        data = rng.bytes(int(rng.integers(0, 300)))
    elif file_op == 3:
        data = data + rng.bytes(20)
    elif file_op == 4:  # members whose npy headers claim 4 TB arrays
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {'descr': '<f4', 'fortran_order': False,
                                                      'shape': (10**12,)})
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, 'w') as zf:
            for k in ('meta', 'features', 'probs', 'crop'):
                zf.writestr(k + '.npy', header.getvalue() + b'\0' * 16)
        data = buf.getvalue()
    untouched = n == 0 and file_op > 4 and not pickled
    return data, untouched


def assert_entry_ok(z: dict, stamp: int) -> None:
    m = z['meta']
    assert isinstance(m, dict) and m['stamp'] == stamp and isinstance(m['label'], str)
    assert m['source'] in ('', 'topic', 'teacher', 'self') and isinstance(m['top'], int)
    assert np.isfinite(float(m['created'])) and np.isfinite(float(m['conf']))
    for k in ('features', 'probs'):
        assert z[k].dtype == np.float32 and z[k].ndim == 1 and np.isfinite(z[k]).all()
    assert z['features'].size > 0


def test_fuzz_entry_files(tmp_path, template):
    name = sorted(template)[0]
    with np.load(io.BytesIO(template[name])) as z:
        arrays = {k: z[k] for k in z.files}
    root = tmp_path / 'store'
    root.mkdir()
    (root / MARKER).write_text('{"format": 1}')
    rng = np.random.default_rng(2024)
    good, owned, bad = {}, set(), set()  # good: stamp -> features size; owned: all four members valid
    for stamp in range(1, 301):
        data, untouched = random_entry(rng, stamp, arrays)
        p = root / entry(stamp)
        p.write_bytes(data)
        z = _read(p, ('meta', 'features', 'probs'))  # what training reads; never raises
        if untouched:
            assert z is not None and _read(p, ('meta', 'crop')) is not None, f'valid entry {stamp} rejected'
        if z is None:
            bad.add(stamp)
            continue
        assert_entry_ok(z, stamp)
        good[stamp] = z['features'].size
        zc = _read(p, ('meta', 'crop'))
        if zc is not None:
            assert zc['crop'].dtype == np.uint8 and zc['crop'].ndim == 1
            owned.add(stamp)
    assert len(owned) > 30 and len(bad) > 100, (len(owned), len(bad))  # both sides exercised

    ro = FrameStore(root, readonly=True, max_entries=10**6)
    assert ro.stamps() == list(range(1, 301))
    assert_well_formed(ro)
    assert set(ro.entries(feature_size=D).stamps.tolist()) == {s for s, d in good.items() if d == D}
    st = FrameStore(root, max_entries=10**6)  # the owner removes exactly the unusable ones
    assert set(st.stamps()) == owned and st.corrupt_removed == 300 - len(owned)
    assert {int(ENTRY.match(p.name).group(1)) for p in root.iterdir() if ENTRY.match(p.name)} == owned
    assert_well_formed(st)
    assert set(st.crops(sorted(owned))[1].tolist()) <= owned
    relabel = sorted(owned)[:20]
    assert all(st.set_label(s, 'green', 'topic', force=True) for s in relabel)
    lab = st.labelled(feature_size=D)
    assert {s for s, name in zip(lab.stamps.tolist(), lab.labels) if name == 'green'} == \
        {s for s in relabel if good[s] == D}
