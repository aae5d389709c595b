"""FrameStore: bounded, crash-safe on-disk store of crops + features + labels."""

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_tl_ros.store import FrameStore

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
