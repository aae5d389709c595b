"""Storage faults with real files, real file systems and real processes.

- disk full (a real, small tmpfs; ``mount`` needs root: skipped with the reason otherwise) while writing a
  new head, and under a running adaptation node (frame store + the accepted head of a round);
- a per-process file size limit (EFBIG, no root needed) while writing a head;
- power loss mid-write: torn (truncated) head files, stale temp files, an orphan head file;
- a read-only state directory (tmpfs remounted read-only as root, ``chmod`` otherwise);
- concurrent writers: two processes adding heads, two processes adding labelled entries;
- a store directory the frame store does not own (the state directory, a folder of user files), an
  unmarked store of the previous version after a power loss, and a round's worker on a store directory
  holding a FIFO, a socket, symlinks, a directory and a huge file named like entries.

Invariant everywhere: no accepted head and no stored label is ever lost or corrupted; the index and the
current head survive every failed write; the store's caps hold. (FrameStore's own ENOSPC/EFBIG, torn
entries and a second writing process are in test_store.py; not repeated here.)
"""

import contextlib
import errno
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from edge_tl_ros.bundle import BundleError, Head, HeadRegistry, load_bundle
from edge_tl_ros.store import MARKER, FrameStore, StoreError
from edge_tl_ros.toy import TOY_CLASSES, make_toy_bundle, toy_frames, toy_head

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO))


# -- helpers ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A real tmpfs of ``size`` at ``path`` (skips the test, with the reason, where mount is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip('mounting a small tmpfs needs root (the EFBIG test covers write failures without it)')
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f'mount -t tmpfs not permitted here: {r.stderr.strip()[:160]}')
    try:
        yield path
    finally:
        subprocess.run(['umount', '-l', str(path)], check=False, capture_output=True)


def free_bytes(path) -> int:
    s = os.statvfs(path)
    return s.f_bavail * s.f_frsize


def fill(path: Path, leave: int = 0) -> Path:
    """Fill the file system of ``path`` so that ``leave`` bytes (a multiple of the page size) stay free."""
    filler = path / 'filler'
    with open(filler, 'ab') as f:
        want = free_bytes(path) - leave
        try:
            while want > 0:
                f.write(b'\0' * min(want, 1 << 20))
                want -= 1 << 20
            f.flush()
            os.fsync(f.fileno())
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def big_head(n_new: int, seed: int = 0, version: int = 0) -> Head:
    """A compatible head with ``n_new`` extra classes (size ~ (3 + n_new) * 40 bytes)."""
    names = list(TOY_CLASSES) + [f'new{i}' for i in range(n_new)]
    rng = np.random.default_rng(seed)
    return Head(rng.normal(size=(len(names), 8)).astype(np.float32),
                rng.normal(size=len(names)).astype(np.float32), names, version)


def snapshot(reg: HeadRegistry) -> dict:
    """Bytes of index.json and of every file in heads/ (to prove a failed write changed nothing)."""
    return {p.name: p.read_bytes() for p in reg.dir.iterdir() if p.name != '.lock'}


def assert_registry_sound(reg: HeadRegistry, expect_current: int | None = None) -> dict:
    """Every accepted version loads (sha256 checked), current loads, no temp files are registered."""
    idx = reg.index()
    for v in idx['accepted']:
        reg.load(v)
    head, warn = reg.load_current_or_fallback()
    assert warn is None, warn
    if expect_current is not None:
        assert idx['current'] == expect_current and head.version == expect_current
    assert all(not meta['file'].endswith('.tmp') for meta in idx['versions'].values())
    return idx


@pytest.fixture
def toy(tmp_path):
    return make_toy_bundle(tmp_path / 'toy')


# -- full disk -------------------------------------------------------------------------------------------
def test_head_add_on_full_disk_keeps_index_and_current_head(toy, tmp_path, monkeypatch):
    import edge_tl_ros.bundle as bundle_mod

    with tmpfs(tmp_path / 'small', '256k') as mnt:
        reg = HeadRegistry(load_bundle(toy), mnt / 'state')
        v1 = reg.add(toy_head(permute=(2, 0, 1)))
        before = snapshot(reg)
        index_writes = []
        real = bundle_mod.atomic_write_json
        monkeypatch.setattr(bundle_mod, 'atomic_write_json',
                            lambda *a, **k: (index_writes.append(a[0]), real(*a, **k))[1])
        head = big_head(1000)
        pages = -(-len(head.to_bytes()) // 4096)

        # 1) no room for the head file itself
        filler = fill(mnt)
        with pytest.raises(OSError) as e:
            reg.add(head)
        assert e.value.errno == errno.ENOSPC and not index_writes
        assert snapshot(reg) == before  # index, current head file: byte-identical; no temp file left
        # 2) room for the head file but not for the new index: the head file must not stay behind
        filler.unlink()
        fill(mnt, leave=pages * 4096)
        with pytest.raises(OSError) as e:
            reg.add(head)
        assert e.value.errno == errno.ENOSPC and index_writes, 'the index write was not reached'
        assert snapshot(reg) == before
        cur = reg.load()
        assert cur.version == 1 and np.array_equal(cur.weight, v1.weight)
        # 3) space freed: the next add works and numbering continues; nothing accepted was lost
        (mnt / 'filler').unlink()
        assert reg.add(head).version == 2
        idx = assert_registry_sound(reg, expect_current=2)
        assert idx['accepted'] == [0, 1, 2]


def test_head_add_efbig_with_file_size_limit(toy, tmp_path):
    """Without root: RLIMIT_FSIZE makes the head write fail (EFBIG) like a full disk."""
    state = tmp_path / 'state'
    reg = HeadRegistry(load_bundle(toy), state)
    reg.add(toy_head(permute=(1, 2, 0)))
    before = snapshot(reg)
    code = textwrap.dedent(f'''
        import errno, resource, signal
        import numpy as np
        from edge_tl_ros.bundle import Head, HeadRegistry, load_bundle
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        reg = HeadRegistry(load_bundle({str(toy)!r}), {str(state)!r})
        names = ['red', 'green', 'blue'] + [f'new{{i}}' for i in range(1000)]
        head = Head(np.ones((len(names), 8), np.float32), np.zeros(len(names), np.float32), names)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
        try:
            reg.add(head)
        except OSError as e:
            print('errno', errno.errorcode[e.errno])
    ''')
    r = subprocess.run([sys.executable, '-c', code], env=ENV, cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and 'errno EFBIG' in r.stdout, r.stdout + r.stderr
    assert snapshot(reg) == before
    assert_registry_sound(reg, expect_current=1)


# -- power loss ------------------------------------------------------------------------------------------
def test_power_loss_torn_head_stale_temps_and_orphan_file(toy, tmp_path):
    bundle = load_bundle(toy)
    reg = HeadRegistry(bundle, tmp_path / 'state')
    heads = {v: reg.add(toy_head(scale=1.0 + v)) for v in (1, 2, 3)}
    # what a crash leaves: temp files of an unfinished head and index write, and a head file whose index
    # entry was never written (crash between the two renames)
    (reg.dir / '.head_v4.npz.x1y2.tmp').write_bytes(heads[3].to_bytes()[:100])
    (reg.dir / '.index.json.a1b2.tmp').write_text('{"current": 4, "acc')
    (reg.dir / 'head_v4.npz').write_bytes(b'PK\x03\x04 torn')
    assert_registry_sound(reg, expect_current=3)
    # a torn current head (file system without data journaling): the registry falls back to v2
    p3 = reg.dir / 'head_v3.npz'
    p3.write_bytes(p3.read_bytes()[:200])
    head, warn = HeadRegistry(bundle, tmp_path / 'state').load_current_or_fallback()
    assert head.version == 2 and 'v3 unusable' in warn
    assert np.array_equal(head.weight, heads[2].weight)
    with pytest.raises(BundleError, match='sha256 mismatch'):
        reg.load(3)
    # the next accepted head gets a fresh number (the orphan v4 file is overwritten, not trusted)
    v4 = reg.add(toy_head(scale=9.0))
    assert v4.version == 4 and reg.load(4).weight[0, 0] == v4.weight[0, 0]
    idx = reg.index()
    assert idx['current'] == 4 and idx['accepted'] == [0, 1, 2, 3, 4]
    for v in (1, 2, 4):
        reg.load(v)
    # a torn index.json (impossible with atomic rename + fsync, but if a copy tool did it): nothing
    # crashes, the bundle head is used and the message says what to do
    (reg.dir / 'index.json').write_text('{"current": 4, "accep')
    head, warn = HeadRegistry(bundle, tmp_path / 'state').load_current_or_fallback()
    assert head.version == 0 and 'corrupt head index' in warn


# -- read-only directory ---------------------------------------------------------------------------------
@contextlib.contextmanager
def read_only(path: Path):
    """Make ``path`` read-only for this process: a tmpfs remounted ro (root) or chmod (non-root)."""
    if os.geteuid() == 0:
        r = subprocess.run(['mount', '-o', 'remount,ro', str(path)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f'cannot remount read-only: {r.stderr.strip()[:160]}')
        try:
            yield
        finally:
            subprocess.run(['mount', '-o', 'remount,rw', str(path)], check=False)
    else:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob('*')] if p.is_dir()}
        for p in modes:
            p.chmod(0o555)
        try:
            yield
        finally:
            for p, m in modes.items():
                p.chmod(m)


def _state_with_heads_and_store(toy, state):
    reg = HeadRegistry(load_bundle(toy), state)
    reg.add(toy_head(permute=(2, 0, 1)))
    reg.add(toy_head(permute=(1, 2, 0)))
    st = FrameStore(state / 'store', crop_size=(8, 8))
    rng = np.random.default_rng(0)
    imgs, y = toy_frames(rng, 6)
    for i, (img, lab) in enumerate(zip(imgs, y)):
        st.add(100 + i, img, rng.normal(size=8).astype(np.float32), np.full(3, 1 / 3, np.float32),
               TOY_CLASSES[lab] if i % 2 else None, 'topic' if i % 2 else '')
    return reg, st


def test_read_only_state_dir(toy, tmp_path, ros_context):
    rclpy = pytest.importorskip('rclpy')
    from rclpy.parameter import Parameter
    from std_srvs.srv import Trigger

    from edge_tl_ros.nodes.adaptation_node import AdaptationNode
    from edge_tl_ros.nodes.perception_node import PerceptionNode

    base = tmp_path / 'ro'
    ctx = tmpfs(base, '4m') if os.geteuid() == 0 else contextlib.nullcontext(base)
    with ctx:
        state = base / 'state'
        reg, st = _state_with_heads_and_store(toy, state)
        labels_before = dict(zip(st.labelled().stamps.tolist(), st.labelled().labels))
        before = snapshot(reg)
        with read_only(base):
            if os.geteuid() != 0 and os.access(state, os.W_OK):
                pytest.skip('chmod does not make the directory read-only here')
            # heads: add and rollback fail with the OS error; index and current head untouched
            with pytest.raises(OSError):
                reg.add(toy_head())
            with pytest.raises(OSError):
                reg.rollback()
            assert snapshot(reg) == before and reg.current_version == 2
            # store: writes are dropped and counted, labels stay as they were
            ro = FrameStore(state / 'store', crop_size=(8, 8))
            assert len(ro) == 6 and ro.corrupt_removed == 0
            assert not ro.add(999, np.zeros((8, 8, 3), np.uint8), np.zeros(8, np.float32),
                              np.full(3, 1 / 3, np.float32), 'red', 'topic')
            assert ro.dropped == 1 and set(ro.dropped_by_errno) <= {'EROFS', 'EACCES'}, ro.dropped_by_errno
            assert not ro.set_label(100, 'red', 'topic') and ro.label_errors == 1

            # the nodes on a read-only state dir: perception serves and refuses rollback with a reason;
            # the adaptation node runs and refuses to claim a wipe that did not happen
            common = [Parameter('model_bundle', value=str(toy)), Parameter('state_dir', value=str(state))]
            perc = PerceptionNode(context=ros_context, parameter_overrides=common)
            adapt = AdaptationNode(context=ros_context, parameter_overrides=common)
            io = rclpy.create_node('ro_io', context=ros_context)
            from rclpy.executors import MultiThreadedExecutor
            ex = MultiThreadedExecutor(num_threads=3, context=ros_context)
            for n in (perc, adapt, io):
                ex.add_node(n)
            import threading
            threading.Thread(target=ex.spin, daemon=True).start()
            try:
                assert perc.head_version == 2

                def call(name):
                    cli = io.create_client(Trigger, name)
                    assert cli.wait_for_service(timeout_sec=10), name
                    fut = cli.call_async(Trigger.Request())
                    deadline = time.monotonic() + 10
                    while not fut.done() and time.monotonic() < deadline:
                        time.sleep(0.02)
                    return fut.result()
                r = call('/perception/rollback')
                assert not r.success and 'keeping head v2' in r.message, r.message
                assert perc.head_version == 2
                r = call('/perception/reload_head')
                assert r.success and perc.head_version == 2
                r = call('/adaptation/wipe_store')
                assert not r.success and 'could not delete 6' in r.message, r.message
            finally:
                ex.shutdown(timeout_sec=2)
                for n in (perc, adapt, io):
                    n.destroy_node()
        after = FrameStore(state / 'store')
        assert dict(zip(after.labelled().stamps.tolist(), after.labelled().labels)) == labels_before
        assert snapshot(reg) == before


# -- concurrent writers ----------------------------------------------------------------------------------
HEAD_WRITER = textwrap.dedent('''
    import sys, time
    import numpy as np
    from edge_tl_ros.bundle import Head, HeadRegistry, load_bundle
    from edge_tl_ros.toy import TOY_CLASSES
    toy, state, wid, n, go = sys.argv[1:6]
    reg = HeadRegistry(load_bundle(toy, check_onnx=False), state)
    while time.time() < float(go):
        time.sleep(0.001)
    for i in range(int(n)):
        # the bias identifies (writer, i): every accepted head must be found again afterwards
        reg.add(Head(np.ones((3, 8), np.float32), np.array([int(wid), i, 0], np.float32), TOY_CLASSES))
''')


def test_two_processes_adding_heads_lose_nothing(toy, tmp_path):
    state = tmp_path / 'state'
    n = 12
    go = time.time() + 3.0  # both start writing at the same moment (after their imports)
    procs = [subprocess.Popen([sys.executable, '-c', HEAD_WRITER, str(toy), str(state), str(w), str(n),
                               str(go)], env=ENV, cwd=REPO, stderr=subprocess.PIPE, text=True)
             for w in (1, 2)]
    for p in procs:
        assert p.wait(90) == 0, p.stderr.read()
    reg = HeadRegistry(load_bundle(toy), state)
    idx = assert_registry_sound(reg, expect_current=2 * n)
    assert idx['accepted'] == list(range(2 * n + 1))
    seen = {(int(h.bias[0]), int(h.bias[1])) for h in (reg.load(v) for v in range(1, 2 * n + 1))}
    assert seen == {(w, i) for w in (1, 2) for i in range(n)}, 'an accepted head was overwritten'
    assert not [p for p in reg.dir.iterdir() if p.name.endswith('.tmp')]


STORE_WRITER = textwrap.dedent('''
    import sys, time
    import numpy as np
    from edge_tl_ros.store import FrameStore
    root, wid, n, go = sys.argv[1:5]
    wid, n = int(wid), int(n)
    st = FrameStore(root, max_entries=1000, crop_size=(16, 16))
    rng = np.random.default_rng(wid)
    while time.time() < float(go):
        time.sleep(0.001)
    for i in range(n):
        stamp = wid * 10**6 + i
        st.add(stamp, rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
               rng.normal(size=8).astype(np.float32), np.full(3, 1 / 3, np.float32))
        st.set_label(stamp, ('red', 'green', 'blue')[i % 3], 'topic')
''')


def test_two_processes_adding_labelled_entries(tmp_path):
    """Two writers (add + label rewrite each) into one store: every label is on disk afterwards, nothing
    is torn, and a store opened with a cap evicts down to it (oldest first) without touching labels."""
    root = tmp_path / 'store'
    n = 40
    go = time.time() + 3.0
    procs = [subprocess.Popen([sys.executable, '-c', STORE_WRITER, str(root), str(w), str(n), str(go)],
                              env=ENV, cwd=REPO, stderr=subprocess.PIPE, text=True) for w in (1, 2)]
    for p in procs:
        assert p.wait(90) == 0, p.stderr.read()
    st = FrameStore(root, max_entries=1000)
    assert st.corrupt_removed == 0 and len(st) == 2 * n
    lab = st.labelled()
    want = {w * 10**6 + i: ('red', 'green', 'blue')[i % 3] for w in (1, 2) for i in range(n)}
    assert dict(zip(lab.stamps.tolist(), lab.labels)) == want
    assert not [p for p in root.iterdir() if p.name.endswith('.tmp')]
    capped = FrameStore(root, max_entries=50)
    assert len(capped) == 50 and len(list(root.glob('f_*.npz'))) == 50
    lab = capped.labelled()
    assert all(want[s] == name for s, name in zip(lab.stamps.tolist(), lab.labels))


# -- the adaptation node on a full disk ------------------------------------------------------------------
def test_adaptation_node_on_full_disk(toy, tmp_path, ros_context):
    """Labelled frames fill a small tmpfs under a running adaptation node: writes that do not fit are
    dropped and counted (ENOSPC in ~/status and /diagnostics), stored labels stay intact; an accepted round
    whose head cannot be written changes nothing (perception keeps its head); after space is freed the
    next round commits."""
    pytest.importorskip('rclpy')
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter
    from std_srvs.srv import Trigger
    from test_adaptation_node import IO, ROUND_PARAMS, wait_for

    from edge_tl_ros.nodes.adaptation_node import AdaptationNode
    from edge_tl_ros.nodes.perception_node import PerceptionNode

    with tmpfs(tmp_path / 'small', '1m') as mnt:
        state = mnt / 'state'
        params = {'model_bundle': str(toy), 'state_dir': str(state), **ROUND_PARAMS, 'advanced.crop_size': 64}
        adapt = AdaptationNode(context=ros_context, parameter_overrides=[Parameter(k, value=v)
                                                                         for k, v in params.items()])
        perc = PerceptionNode(context=ros_context, parameter_overrides=[
            Parameter('model_bundle', value=str(toy)), Parameter('state_dir', value=str(state))])
        io = IO(ros_context)
        ex = MultiThreadedExecutor(num_threads=4, context=ros_context)
        for n in (adapt, perc, io.node):
            ex.add_node(n)
        import threading
        threading.Thread(target=ex.spin, daemon=True).start()
        try:
            assert wait_for(lambda: io.pub_img.get_subscription_count() >= 2
                            and io.pub_lab.get_subscription_count(), 10)
            # noise frames: incompressible 64x64 PNG crops, ~13 KB each -> the 1 MiB tmpfs fills up
            rng = np.random.default_rng(0)
            imgs, y = toy_frames(rng, 120, size=64, shifted=True)
            imgs = np.clip(imgs.astype(np.int16) + rng.integers(-60, 60, imgs.shape), 0, 255).astype(np.uint8)
            io.send(imgs, y, period=0.01)
            c = adapt.collector.counters
            assert wait_for(lambda: adapt.store.stats()['dropped_by_reason'].get('ENOSPC', 0) > 0
                            and c['labels_applied'] + c['frames_not_stored'] >= 110,
                            30), adapt.status()
            s = adapt.status()
            assert s['store']['dropped'] == s['counters']['frames_not_stored'] > 0
            stored = dict(zip(adapt.store.labelled().stamps.tolist(), adapt.store.labelled().labels))
            assert len(stored) >= 30
            # what is on disk is exactly what the node believes, with the labels it applied
            disk = FrameStore(state / 'store', max_entries=10**6, max_bytes=1 << 40, readonly=True)
            assert dict(zip(disk.labelled().stamps.tolist(), disk.labelled().labels)) == stored
            assert wait_for(lambda: any(kv.key == 'store_dropped' and int(kv.value) > 0
                                        for d in io.diag for st in d.status if 'adaptation' in st.name
                                        for kv in st.values), 5)
            # the disk is full to the last byte: the accepted round's head cannot be written
            fill(mnt)
            assert io.call(io.adapt_now).success
            assert wait_for(lambda: adapt.rounds == 1, 60), adapt.status()
            last = adapt.last_round
            assert not last['accepted'] and last['failed'], last
            assert 'could not write the head' in last['reason'], last
            assert 'No space left' in last['reason']
            reg = HeadRegistry(load_bundle(toy), state)
            assert reg.current_version == 0 and adapt.engine.head.version == 0 and perc.head_version == 0
            assert not [p for p in (state / 'heads').iterdir() if p.name.startswith(('head_v', '.head'))]
            # space again (the operator lowers the store cap at run time: the oldest entries go): the
            # next round commits v1 and perception reloads it
            (mnt / 'filler').unlink()
            keep = len(adapt.store) * 2 // 3
            assert adapt.set_parameters([Parameter('store.max_entries', value=keep)])[0].successful
            assert len(adapt.store) == keep == len(list((state / 'store').glob('f_*.npz')))
            assert io.call(io.adapt_now).success
            assert wait_for(lambda: perc.head_version == 1, 60), adapt.status()
            assert adapt.last_round['accepted'] and reg.current_version == 1
            after = dict(zip(adapt.store.labelled().stamps.tolist(), adapt.store.labelled().labels))
            assert after.items() <= stored.items() and len(after) >= keep - 5  # no label lost or changed
            cli = io.node.create_client(Trigger, '/adaptation/wipe_store')
            assert io.call(cli).success and not list((state / 'store').glob('f_*.npz'))
        finally:
            ex.shutdown(timeout_sec=2)
            for n in (adapt, perc, io.node):
                n.destroy_node()
        assert json.loads((state / 'heads' / 'index.json').read_text())['current'] == 1


# -- a store directory the store does not own, hostile contents, an upgrade ------------------------------
def _tree(root: Path) -> dict:
    """Every path under ``root`` -> (file type, bytes of regular files / a symlink's target)."""
    out = {}
    for p in [root, *root.rglob('*')]:
        st = p.lstat()
        out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), p.read_bytes() if stat.S_ISREG(st.st_mode)
                                         else os.readlink(p) if p.is_symlink() else None)
    return out


def test_store_dir_holding_user_files_is_refused_untouched(toy, tmp_path):
    """store_dir misconfigured to the state directory itself (heads live there) or to a folder of the
    user's files: the store refuses with the reason and deletes nothing -- not even files named like
    its own entries (an unmarked directory's f_*.npz may be someone else's)."""
    reg, _ = _state_with_heads_and_store(toy, tmp_path / 'state')
    before = _tree(tmp_path / 'state')
    with pytest.raises(StoreError, match=r'did not write .*heads.*choose an empty or dedicated directory'):
        FrameStore(tmp_path / 'state')
    pictures = tmp_path / 'Pictures'
    pictures.mkdir()
    (pictures / 'holiday.png').write_bytes(b'\x89PNG user photo')
    (pictures / 'f_00000000000000000001.npz').write_bytes(b'someone else\'s array')
    (pictures / '.f_00000000000000000002.npz.abc.tmp').write_bytes(b'an editor\'s temp file')
    os.utime(pictures / '.f_00000000000000000002.npz.abc.tmp', (1e9, 1e9))  # "stale"
    (pictures / 'link').symlink_to(tmp_path / 'state' / 'heads')
    pics = _tree(pictures)
    with pytest.raises(StoreError, match='holiday.png'):
        FrameStore(pictures, max_entries=1)
    assert _tree(pictures) == pics and _tree(tmp_path / 'state') == before
    assert_registry_sound(reg, expect_current=2)


def test_upgrade_of_an_unmarked_store_after_power_loss(tmp_path):
    """A store written by the previous version (no marker) that lost power mid-write: a torn entry, temp
    files of an entry and of the marker, and a negative-stamp entry the old version could write. The new
    store adopts it, keeps every intact label, removes only its own unusable files and marks it."""
    root = tmp_path / 'store'
    st = FrameStore(root, crop_size=(8, 8))
    rng = np.random.default_rng(7)
    imgs, y = toy_frames(rng, 6)
    for i, (img, lab) in enumerate(zip(imgs, y)):
        st.add(100 + i, img, rng.normal(size=8).astype(np.float32), np.full(3, 1 / 3, np.float32),
               TOY_CLASSES[lab], 'topic')
    labels = dict(zip(st.labelled().stamps.tolist(), st.labelled().labels))
    (root / MARKER).unlink()  # what the previous version left: entries only
    torn = root / f'f_{105:020d}.npz'
    torn.write_bytes(torn.read_bytes()[:300])
    del labels[105]
    old = time.time() - 3600
    for name in (f'.f_{106:020d}.npz.k2j3.tmp', f'.{MARKER}.a9_b.tmp', f'f_{-3:020d}.npz'):
        (root / name).write_bytes(b'half')
        os.utime(root / name, (old, old))
    new = FrameStore(root, max_entries=100)
    assert dict(zip(new.labelled().stamps.tolist(), new.labelled().labels)) == labels
    assert new.corrupt_removed == 2 and new.skipped == {}
    assert sorted(p.name for p in root.iterdir()) == [MARKER] + [f'f_{s:020d}.npz' for s in sorted(labels)]
    assert json.loads((root / MARKER).read_text())['format'] == 1


def test_round_worker_on_a_hostile_store_dir(tmp_path, monkeypatch):
    """A round's worker process opens the store read-only while the directory holds a FIFO named like an
    entry (np.load on it blocks forever), a symlink named like an entry to an entry outside the store,
    a directory, a socket and a huge sparse file: it finishes, reads only the real entries and changes
    nothing; the writing store skips the same files and never deletes them."""
    import socket

    root = tmp_path / 'store'
    st = FrameStore(root, crop_size=(8, 8))
    other = FrameStore(tmp_path / 'other', crop_size=(8, 8))
    rng = np.random.default_rng(8)
    for s, store in ((10, st), (11, st), (12, st), (13, st), (20, other)):
        store.add(s, rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), rng.normal(size=8).astype(np.float32),
                  np.full(3, 1 / 3, np.float32), 'red', 'topic')
    outside = other.root / f'f_{20:020d}.npz'  # a valid entry: following the link would "work"
    os.mkfifo(root / f'f_{1:020d}.npz')
    (root / f'f_{20:020d}.npz').symlink_to(outside)
    (root / f'f_{3:020d}.npz').mkdir()
    monkeypatch.chdir(root)  # a relative socket path (AF_UNIX paths are limited to 108 bytes)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(f'f_{4:020d}.npz')
    with open(root / f'f_{5:020d}.npz', 'wb') as f:
        f.truncate((64 << 20) + 1)
    before, outside_bytes = _tree(root), outside.read_bytes()
    code = textwrap.dedent(f'''
        from edge_tl_ros.store import FrameStore
        st = FrameStore({str(root)!r}, readonly=True)
        arr = st.entries()
        crops, found = st.crops(st.stamps())
        print(sorted(arr.stamps.tolist()), sorted(found.tolist()), sorted(st.skipped.items()))
    ''')
    try:
        r = subprocess.run([sys.executable, '-c', code], env=ENV, cwd=REPO, capture_output=True, text=True,
                           timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail('the read-only store blocked on a non-regular file')
    assert r.returncode == 0, r.stderr
    assert r.stdout.split('\n')[0] == ("[10, 11, 12, 13] [10, 11, 12, 13] "
                                       "[('not_regular', 4), ('too_large', 1)]"), r.stdout
    writer = FrameStore(root)
    writer.rescan()
    assert writer.stamps() == [10, 11, 12, 13] and writer.corrupt_removed == 0
    assert writer.skipped == {'not_regular': 4, 'too_large': 1}
    assert _tree(root) == before and outside.read_bytes() == outside_bytes
    sock.close()


def test_atomic_write_gives_the_mode_a_plain_open_would(tmp_path):
    """A bundle written on a workstation must be readable by the robot's service user: not the 0600 of a
    temporary file. A new file gets 0666 minus the umask; a replaced file keeps its mode."""
    from edge_tl_ros.atomic import atomic_write_bytes

    old = os.umask(0o022)
    try:
        new = atomic_write_bytes(tmp_path / 'manifest.yaml', b'a: 1\n')
        assert stat.S_IMODE(new.stat().st_mode) == 0o644
        private = tmp_path / 'labels.json'
        private.write_bytes(b'{}')
        private.chmod(0o600)
        atomic_write_bytes(private, b'{"x": 1}')
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
        assert private.read_bytes() == b'{"x": 1}'
        os.umask(0o077)
        assert stat.S_IMODE(atomic_write_bytes(tmp_path / 'other', b'x').stat().st_mode) == 0o600
    finally:
        os.umask(old)
    assert not list(tmp_path.glob('.*.tmp'))
