"""FrameStore: bounded, crash-safe on-disk store of crops + features + labels."""

import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_tl_ros.atomic import atomic_write_bytes
from edge_tl_ros.store import _NAME, MARKER, FrameStore, StoreError, _pack, stamp_to_ns, valid_stamp

D, C = 16, 3


def noise(rng, size=16):
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)  # incompressible PNG


def add(store, rng, stamp, label=None, source='', created=None, size=16):
    p = rng.dirichlet(np.ones(C)).astype(np.float32)
    return store.add(stamp, noise(rng, size), rng.normal(size=D).astype(np.float32), p, label, source,
                     created=created)


def files(root):
    return sorted(p for p in Path(root).iterdir() if p.name.startswith('f_'))


def disk_bytes(root):
    return sum(p.stat().st_size for p in files(root))


def test_roundtrip_and_arrays(tmp_path):
    rng = np.random.default_rng(0)
    st = FrameStore(tmp_path / 's', crop_size=(8, 8))
    img = noise(rng, 24)
    feats = np.arange(D, dtype=np.float32)
    probs = np.array([0.1, 0.7, 0.2], np.float32)
    assert st.add(123, img, feats, probs)
    assert add(st, rng, 456, 'red', 'topic')
    arr = st.entries()
    assert list(arr.stamps) == [123, 456] and arr.features.shape == (2, D)
    np.testing.assert_array_equal(arr.features[0], feats)
    assert arr.top[0] == 1 and arr.conf[0] == pytest.approx(0.7)
    assert arr.labels == [None, 'red'] and arr.sources == ['', 'topic']
    lab = st.labelled()
    assert list(lab.stamps) == [456]
    crops, found = st.crops([123, 999])
    assert crops.shape == (1, 8, 8, 3) and list(found) == [123]
    # reopened from disk: same content
    st2 = FrameStore(tmp_path / 's')
    assert st2.stamps() == [123, 456] and st2.labelled().labels == ['red']


def test_count_and_byte_caps_hold_oldest_evicted(tmp_path):
    rng = np.random.default_rng(1)
    st = FrameStore(tmp_path / 's', max_entries=5)
    for i in range(12):
        assert add(st, rng, 1000 + i, created=100.0 + i)
        assert len(st) <= 5 and len(files(st.root)) <= 5
    assert st.stamps() == [1007, 1008, 1009, 1010, 1011]
    size = st.total_bytes / len(st)
    st.set_caps(max_entries=100, max_bytes=int(3.5 * size))
    assert len(st) == 3 and disk_bytes(st.root) <= st.max_bytes
    for i in range(5):
        assert add(st, rng, 2000 + i, created=200.0 + i)
        assert st.total_bytes <= st.max_bytes and disk_bytes(st.root) <= st.max_bytes
    assert st.stamps() == [2002, 2003, 2004]
    # an entry larger than the whole byte budget is dropped, not written
    assert not st.add(3000, noise(rng), np.zeros(100_000, np.float32), np.ones(C, np.float32) / C)
    assert st.dropped == 1 and 3000 not in st


def test_age_eviction(tmp_path):
    rng = np.random.default_rng(2)
    st = FrameStore(tmp_path / 's', max_age_s=50)
    now = time.time()
    add(st, rng, 1, created=now - 100)
    add(st, rng, 2, created=now - 10)
    assert st.stamps() == [2]  # the old one went as soon as something was added
    add(st, rng, 3, created=now - 60)  # already too old: evicted by the next check
    st.evict_expired()
    assert st.stamps() == [2]
    # start-up also applies the age cap
    st2 = FrameStore(tmp_path / 's', max_age_s=5)
    assert st2.stamps() == []


def test_truncated_and_garbage_entries_skipped_and_removed_at_start(tmp_path):
    rng = np.random.default_rng(3)
    st = FrameStore(tmp_path / 's')
    for i in range(4):
        add(st, rng, 10 + i, 'red', 'topic')
    victim = st.root / f'f_{11:020d}.npz'
    data = victim.read_bytes()
    victim.write_bytes(data[:len(data) // 2])  # a torn write (e.g. a copy without the atomic rename)
    (st.root / f'f_{99:020d}.npz').write_bytes(b'not an npz at all')
    stale = st.root / '.f_00000000000000000050.npz.abc.tmp'
    stale.write_bytes(b'half')
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    fresh_tmp = st.root / '.f_00000000000000000051.npz.def.tmp'  # maybe another writer, right now
    fresh_tmp.write_bytes(b'half')

    st2 = FrameStore(tmp_path / 's')
    assert st2.stamps() == [10, 12, 13]
    assert st2.corrupt_removed == 2
    assert not victim.exists() and not stale.exists() and fresh_tmp.exists()
    assert len(st2.labelled()) == 3


def test_wipe(tmp_path):
    rng = np.random.default_rng(4)
    st = FrameStore(tmp_path / 's')
    for i in range(5):
        add(st, rng, i)
    assert st.wipe() == 5
    assert len(st) == 0 and files(st.root) == [] and st.total_bytes == 0
    assert add(st, rng, 7)
    assert st.stamps() == [7]


def test_label_by_stamp_and_source_priority(tmp_path):
    rng = np.random.default_rng(5)
    st = FrameStore(tmp_path / 's')
    add(st, rng, 5)
    add(st, rng, 6)
    assert not st.set_label(404, 'red')  # unknown stamp
    assert st.set_label(5, 'red', 'teacher')
    assert st.set_label(5, 'green', 'topic')  # more trusted source overrides
    assert not st.set_label(5, 'blue', 'teacher')  # less trusted does not
    assert not st.set_label(5, 'blue', 'self')
    assert st.set_label(6, 'blue', 'self')
    with pytest.raises(ValueError):
        st.set_label(6, 'blue', 'oracle')
    st2 = FrameStore(tmp_path / 's')  # persisted
    lab = st2.labelled()
    assert dict(zip(lab.stamps.tolist(), lab.labels)) == {5: 'green', 6: 'blue'}
    assert st2.label_counts() == {'unlabelled': 0, 'topic': 1, 'teacher': 0, 'self': 1}
    assert list(st2.labelled(sources=('topic',)).stamps) == [5]
    assert st2.set_label(5, 'blue', 'teacher', force=True)


def test_thread_safe_and_second_process(tmp_path):
    root = tmp_path / 's'
    st = FrameStore(root, max_entries=40)
    # a second process writes entries into the same directory at the same time
    code = textwrap.dedent(f'''
        import numpy as np
        from edge_tl_ros.store import FrameStore
        st = FrameStore({str(root)!r}, max_entries=1000)
        rng = np.random.default_rng(9)
        for i in range(30):
            st.add(10**12 + i, rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
                   rng.normal(size={D}).astype(np.float32), np.full({C}, 1 / {C}, np.float32))
    ''')
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, '-c', code], env=env)

    def writer(k):
        rng = np.random.default_rng(k)
        for i in range(25):
            add(st, rng, k * 1000 + i)
            if i % 5 == 0:
                st.set_label(k * 1000 + i, 'red', 'topic')

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(1, 5)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert proc.wait(60) == 0
    assert len(st) <= 40
    st2 = FrameStore(root, max_entries=1000)
    assert st2.corrupt_removed == 0
    assert len(st2) == 40 + 30
    assert not [p for p in root.iterdir() if p.name.endswith('.tmp')]


def _check_full_disk(root):
    """Fill a small filesystem until ENOSPC; nothing corrupt, drops counted, works after freeing."""
    rng = np.random.default_rng(6)
    st = FrameStore(root, max_entries=10_000, max_bytes=100 << 20, crop_size=(32, 32))
    ok = 0
    for i in range(1000):
        if add(st, rng, i, size=32):
            ok += 1
        elif st.dropped >= 3:
            break
    assert st.dropped >= 3 and 0 < ok < 1000
    assert 'ENOSPC' in st.dropped_by_errno, st.dropped_by_errno
    assert not [p for p in Path(root).iterdir() if p.name.endswith('.tmp')]  # no leftovers
    # a label rewrite that cannot be written keeps the old entry intact
    st.set_label(st.stamps()[-1], 'red', 'topic')
    st2 = FrameStore(root, max_entries=10_000, max_bytes=100 << 20)
    assert st2.corrupt_removed == 0 and len(st2) == len(st)
    # freeing space by tightening the cap makes writes succeed again
    st.set_caps(max_entries=len(st) // 2)
    assert add(st, rng, 5000, size=32)


def test_disk_full_enospc_on_small_tmpfs(tmp_path):
    mnt = tmp_path / 'small'
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip('mounting a 200 KiB tmpfs needs root; the RLIMIT_FSIZE test covers the write failure')
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=200k', 'tmpfs', str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f'mount -t tmpfs not permitted here ({r.stderr.strip()[:120]}); '
                    'the RLIMIT_FSIZE test covers the write failure')
    try:
        _check_full_disk(mnt / "store")
    finally:
        subprocess.run(['umount', str(mnt)], check=False)


def test_write_failure_efbig_with_rlimit_fsize(tmp_path):
    """A per-process file size limit makes large writes fail (EFBIG) like a full disk would."""
    root = tmp_path / 's'
    code = textwrap.dedent(f'''
        import resource, signal
        import numpy as np
        from pathlib import Path
        from edge_tl_ros.store import FrameStore
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        st = FrameStore({str(root)!r}, crop_size=(8, 8))
        rng = np.random.default_rng(0)
        f = np.zeros({D}, np.float32); p = np.full({C}, 1 / {C}, np.float32)
        assert st.add(1, rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), f, p, 'red', 'topic')
        resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000))
        st.crop_size = (96, 96)  # ~27 KB PNG of noise: larger than the limit
        assert not st.add(2, rng.integers(0, 256, (96, 96, 3), dtype=np.uint8), f, p)
        assert st.dropped == 1 and 'EFBIG' in st.dropped_by_errno, st.dropped_by_errno
        assert st.stamps() == [1]
        assert not [q for q in Path({str(root)!r}).iterdir() if q.name.endswith('.tmp')]
        print('ok')
    ''')
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and 'ok' in r.stdout, r.stderr
    st = FrameStore(root)
    assert st.stamps() == [1] and st.corrupt_removed == 0


# -- boundary validation: stamps, ownership, non-regular files, non-finite data, wipe --------------------


def entry(stamp):
    return f'f_{stamp:020d}.npz'


def listing(root):
    """name -> (file type, bytes of regular files) of everything in ``root``."""
    out = {}
    for p in Path(root).iterdir():
        st = p.lstat()
        out[p.name] = (stat.S_IFMT(st.st_mode), p.read_bytes() if stat.S_ISREG(st.st_mode) else None)
    return out


def test_stamp_to_ns_normalises_and_valid_stamp():
    assert stamp_to_ns(1, 1_500_000_000) == 2_500_000_000  # nanosec >= 1e9 carries into sec
    assert stamp_to_ns(2**31 - 1, 2**32 - 1) == (2**31 - 1) * 10**9 + 2**32 - 1
    assert valid_stamp(stamp_to_ns(2**31 - 1, 2**32 - 1)) and valid_stamp(0) and valid_stamp(np.int64(7))
    assert stamp_to_ns(-1, 0) == -10**9 and not valid_stamp(stamp_to_ns(-1, 0))  # returned, not raised
    assert valid_stamp(stamp_to_ns(-1, 1_500_000_000))  # -1 s + 1.5 s = 0.5 s
    for bad in (-1, 2**63, 10**20, 10**21, True, 1.0, '5', None, np.float64(3)):
        assert not valid_stamp(bad), bad


def test_bad_stamps_are_counted_drops_and_never_files(tmp_path):
    rng = np.random.default_rng(10)
    st = FrameStore(tmp_path / 's', crop_size=(8, 8))
    bad = [-1, stamp_to_ns(-5, 3), 2**63, 10**20, 10**25, 1.5, 'x']
    for s in bad:
        assert not add(st, rng, s)
        assert not st.set_label(s, 'red')
        assert s not in st
    assert st.dropped == len(bad) == st.dropped_by_errno['bad_stamp']
    assert st.stats()['dropped'] == sum(st.stats()['dropped_by_reason'].values())
    # seeded random ROS times (int32 sec, uint32 nanosec): stored iff valid, always under the store's name
    for _ in range(60):
        sec, nsec = int(rng.integers(-2**31, 2**31)), int(rng.integers(0, 2**32))
        ns = stamp_to_ns(sec, nsec)
        assert add(st, rng, ns) == valid_stamp(ns) == (ns >= 0)
    names = [p.name for p in st.root.iterdir() if p.name != MARKER]
    assert names and all(_NAME.match(n) for n in names)
    assert sorted(int(_NAME.match(n).group(1)) for n in names) == st.stamps()
    assert FrameStore(st.root).stamps() == st.stamps()


def test_marker_created_adopted_and_foreign_directory_refused(tmp_path):
    rng = np.random.default_rng(11)
    st = FrameStore(tmp_path / 'new')
    assert json.loads((st.root / MARKER).read_text())['format'] == 1
    add(st, rng, 1, 'red', 'topic')
    add(st, rng, 2)
    # an older store (no marker, a stale temp of a crashed writer): adopted, marker written
    old = tmp_path / 'old'
    old.mkdir()
    for p in files(st.root):
        (old / p.name).write_bytes(p.read_bytes())
    (old / '.f_00000000000000000003.npz.a1_b2.tmp').write_bytes(b'half')
    legacy = old / f'f_{-5:020d}.npz'  # how the old version stored a negative stamp (an unusable entry)
    legacy.write_bytes((st.root / entry(1)).read_bytes())
    (old / f'.{legacy.name}.x.tmp').write_bytes(b'half')
    (old / f'.{MARKER}.Zz_9.tmp').write_bytes(b'{"form')  # power loss while an older run marked it
    ro = FrameStore(old, readonly=True)
    assert ro.stamps() == [1, 2] and ro.skipped == {'bad_stamp': 1} and not (old / MARKER).exists()
    adopted = FrameStore(old)
    assert adopted.stamps() == [1, 2] and (old / MARKER).is_file()
    assert adopted.corrupt_removed == 1 and not legacy.exists()
    # a directory with anything else: refused with a clear error, nothing deleted or written
    for junk in ('notes.txt', 'f_1.npz', '.f_1.npz.abc.tmp', 'f_-1.npz', 'f_٠٠٠٠٠٠٠٠٠٠٠٠٠٠٠٠٠٠٠١.npz'):
        d = tmp_path / f'user_{len(junk)}_{junk[0]}'
        d.mkdir()
        (d / junk).write_bytes(b'user data')
        (d / entry(1)).write_bytes((st.root / entry(1)).read_bytes())
        before = listing(d)
        with pytest.raises(StoreError, match='did not write') as e:
            FrameStore(d)
        assert isinstance(e.value, ValueError) and junk in str(e.value)
        assert listing(d) == before
        # a round's worker (read-only) reads it without writing anything
        ro = FrameStore(d, readonly=True)
        assert ro.stamps() == [1] and len(ro.entries()) == 1 and listing(d) == before
    # a newer format is refused; a garbage marker in a directory of our own files is rewritten
    (old / MARKER).write_text('{"format": 2}')
    with pytest.raises(StoreError, match='newer'):
        FrameStore(old)
    (old / MARKER).write_bytes(b'\x00garbage')
    assert FrameStore(old).stamps() == [1, 2] and json.loads((old / MARKER).read_text())['format'] == 1
    (tmp_path / 'a_file').write_text('x')
    with pytest.raises(StoreError, match='not a directory'):
        FrameStore(tmp_path / 'a_file')


def test_marked_store_leaves_foreign_and_non_regular_files_alone(tmp_path):
    rng = np.random.default_rng(12)
    st = FrameStore(tmp_path / 's', crop_size=(8, 8))
    for i in range(3):
        add(st, rng, i + 1, 'red', 'topic')
    outside = tmp_path / 'outside.npz'
    outside.write_bytes((st.root / entry(1)).read_bytes())  # a valid entry: following would "work"
    old = time.time() - 3600
    for name in ('notes.tmp', '.other.tmp', '.f_1.npz.abc.tmp', 'f_1.npz', 'f_-1.npz',
                 '.f_00000000000000000009.npz.abc.tmp.bak'):
        (st.root / name).write_bytes(b'not ours')
        os.utime(st.root / name, (old, old))
    (st.root / entry(7)).mkdir()
    (st.root / entry(7) / 'keep').write_text('x')
    (st.root / entry(8)).symlink_to(outside)
    (st.root / '.f_00000000000000000008.npz.abc.tmp').symlink_to(outside)
    (st.root / entry(99)).write_bytes(b'x')  # ours (marked dir), corrupt: removed
    big = st.root / entry(98)  # a sparse file larger than the read limit: never read, never deleted
    with open(big, 'wb') as f:
        f.truncate(st.read_limit + 1)
    foreign = {k: v for k, v in listing(st.root).items() if k not in (entry(99), MARKER)
               and not k.startswith('f_000')} | {entry(7): listing(st.root)[entry(7)],
                                                 entry(8): listing(st.root)[entry(8)]}
    st2 = FrameStore(st.root)
    assert st2.stamps() == [1, 2, 3] and st2.corrupt_removed == 1
    assert st2.skipped == {'foreign': 6, 'not_regular': 3, 'too_large': 1}, st2.skipped
    now = listing(st2.root)
    assert all(now[k] == v for k, v in foreign.items()) and big.stat().st_size == st2.read_limit + 1
    assert outside.read_bytes() == (st.root / entry(1)).read_bytes()
    assert len(st2.labelled()) == 3 and st2.remaining_entries() == 4  # 3 entries + the big one
    assert st2.wipe() == 4 and st2.remaining_entries() == 0 and len(st2) == 0
    now = listing(st2.root)
    assert all(now[k] == v for k, v in foreign.items()) and MARKER in now and outside.exists()
    assert FrameStore(st.root).stamps() == []


@pytest.mark.parametrize('readonly', [False, True])
def test_fifo_named_like_an_entry_never_blocks(tmp_path, readonly):
    rng = np.random.default_rng(13)
    st = FrameStore(tmp_path / 's', crop_size=(8, 8))
    add(st, rng, 2, 'red', 'topic')
    fifo = st.root / entry(1)
    os.mkfifo(fifo)
    out = {}

    def work():
        s = FrameStore(st.root, readonly=readonly)
        s.rescan()
        out['stamps'], out['n'], out['crops'] = s.stamps(), len(s.entries()), len(s.crops([1, 2])[1])
        out['skipped'] = s.skipped

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(30)
    if t.is_alive():  # unblock the hung open so the suite can go on, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail('opening the store blocked on a FIFO')
    assert out == {'stamps': [2], 'n': 1, 'crops': 1, 'skipped': {'not_regular': 1}}
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    if not readonly:
        assert st.wipe() == 1 and stat.S_ISFIFO(fifo.lstat().st_mode)


def test_non_finite_and_wrong_size_input_dropped(tmp_path):
    rng = np.random.default_rng(14)
    st = FrameStore(tmp_path / 's', crop_size=(8, 8), feature_size=D)
    img, f, p = noise(rng, 8), np.ones(D, np.float32), np.full(C, 1 / C, np.float32)
    nan_f, inf_p = f.copy(), p.copy()
    nan_f[3], inf_p[0] = np.nan, np.inf
    assert not st.add(1, img, nan_f, p) and not st.add(2, img, f, inf_p)
    assert not st.add(3, img, np.full(D, 1e300), p)  # finite float64, inf as float32
    assert not st.add(4, img, np.ones(D + 1, np.float32), p) and not st.add(5, img, [], p)
    assert not st.add(6, img, f, p, label=['red'], source='topic')
    assert not st.add(7, img, f, p, created=float('nan'))
    assert not st.add(8, np.zeros((0, 0, 3), np.uint8), f, p)
    assert st.dropped_by_errno == {'non_finite': 3, 'bad_shape': 2, 'bad_label': 1, 'bad_created': 1,
                                   'bad_image': 1}
    assert st.dropped == 8 and len(st) == 0 and st.remaining_entries() == 0
    assert st.add(9, img, f, p) and st.stamps() == [9]


def test_stored_non_finite_entries_skipped_not_poisoning(tmp_path):
    rng = np.random.default_rng(15)
    st = FrameStore(tmp_path / 's', crop_size=(8, 8))
    for i in range(4):
        add(st, rng, 10 + i, 'red', 'topic')
    # another writer (an older version) replaces entries with NaN features / Inf probs
    meta = {'stamp': 11, 'created': time.time(), 'label': 'red', 'source': 'topic', 'top': 0, 'conf': 1.0}
    crop = st.encode_crop(noise(rng, 8))
    atomic_write_bytes(st.root / entry(11), _pack(meta, np.full(D, np.nan, np.float32),
                                                  np.ones(C, np.float32), crop))
    atomic_write_bytes(st.root / entry(12), _pack(dict(meta, stamp=12), np.ones(D, np.float32),
                                                  np.array([np.inf, 0, 0], np.float32), crop))
    for _ in range(3):  # every round reads the good ones; each bad entry is counted once
        arr = st.labelled()
        assert list(arr.stamps) == [10, 13] and np.isfinite(arr.features).all()
        assert list(st.entries().stamps) == [10, 13]
    assert st.skipped_non_finite == 2 == st.stats()['skipped_non_finite']
    ro = FrameStore(st.root, readonly=True)
    assert list(ro.entries().stamps) == [10, 13] and ro.skipped_non_finite == 2
    assert (st.root / entry(11)).exists()  # read-only: nothing deleted
    st2 = FrameStore(st.root)  # the owner removes them at start-up
    assert st2.stamps() == [10, 13] and st2.corrupt_removed == 2


def test_wipe_reports_what_is_left(tmp_path, monkeypatch):
    rng = np.random.default_rng(16)
    st = FrameStore(tmp_path / 's', crop_size=(8, 8))
    for i in range(4):
        add(st, rng, i)
    (st.root / 'f_-1.npz').write_bytes(b'x')  # not a name the store writes: not counted, not deleted
    real = os.unlink
    stuck = str(st.root / entry(2))

    def unlink(path, *a, **k):
        if str(path) == stuck:
            raise PermissionError(13, 'Permission denied', path)
        return real(path, *a, **k)

    monkeypatch.setattr(os, 'unlink', unlink)
    assert st.wipe() == 3
    assert st.remaining_entries() == 1 and st.stamps() == [2] and 'Permission denied' in st.last_error
    monkeypatch.setattr(os, 'unlink', real)
    assert st.wipe() == 1 and st.remaining_entries() == 0 and len(st) == 0
    assert (st.root / 'f_-1.npz').exists() and (st.root / MARKER).exists()
