"""The model bundle and head registry boundary (edge_tl_ros/bundle.py, atomic.py).

Everything read from disk is validated once, in the ROS-free core: a malformed manifest, index.json or head
file is a :class:`BundleError` with one line, never a KeyError/TypeError/OverflowError/RecursionError/
MemoryError; ``load_current_or_fallback`` never raises. Unit tests per fault, then seeded fuzz loops
(a few hundred inputs each, bounded, no wall-clock thresholds) against a real registry on a real bundle.
"""

import copy
import hashlib
import io
import json
import math
import os
import random
import shutil
import struct
import tracemalloc
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from edge_tl_ros import bundle as bundle_mod
from edge_tl_ros.atomic import load_npz, npz_bytes
from edge_tl_ros.bundle import (MAX_CLASS_NAME_CHARS, MAX_CLASSES, MAX_INDEX_BYTES, BundleError, Head,
                                HeadRegistry, check_class_name, load_bundle, write_manifest)
from edge_tl_ros.toy import TOY_CLASSES, make_toy_bundle, toy_head

REPO = Path(__file__).resolve().parents[1]
STUDENT = REPO / 'models' / 'gtsrb_student'


@pytest.fixture
def toy(tmp_path):
    return make_toy_bundle(tmp_path / 'toy')


def one_line(fn, *args, **kwargs):
    """Call ``fn``; return its result, or None if it raised a one-line BundleError (anything else fails)."""
    try:
        return fn(*args, **kwargs)
    except BundleError as e:
        assert '\n' not in str(e) and str(e), repr(e)
        return None


def register(reg: HeadRegistry, version: int, data: bytes | None, sha: str | None = 'auto') -> None:
    """Register ``data`` as head ``version`` and make it current, bypassing HeadRegistry.add."""
    p = reg.dir / f'head_v{version}.npz'
    if data is not None:
        p.write_bytes(data)
    idx = reg.index()
    meta = {'file': p.name, 'created': 0.0, 'metrics': {}}
    if sha is not None:
        meta['sha256'] = hashlib.sha256(data or b'').hexdigest() if sha == 'auto' else sha
    idx['versions'][str(version)] = meta
    idx['accepted'] = [v for v in idx['accepted'] if v != version] + [version]
    idx['current'] = version
    reg.index_path.write_text(json.dumps(idx))


def outside_snapshot(tmp_path: Path) -> set:
    """What lies next to this test's tmp_path (nothing may be created there)."""
    return set(os.listdir(tmp_path.parent))


# -- 1. index.json ---------------------------------------------------------------------------------------
def _valid_index():
    return {'current': 2, 'accepted': [0, 1, 2], 'versions': {
        '1': {'file': 'head_v1.npz', 'sha256': '0' * 64}, '2': {'file': 'head_v2.npz', 'sha256': '0' * 64}}}


def _with(**kw):
    idx = _valid_index()
    idx.update(kw)
    return json.dumps(idx, allow_nan=True).encode()


MALFORMED_INDEXES = {
    'list': b'[]', 'string': b'"x"', 'number': b'1', 'null': b'null', 'empty_object': b'{}',
    'no_versions': b'{"current": 0, "accepted": [0]}',
    'versions_list': _with(versions=[]), 'versions_string': _with(versions='abc'),
    'entry_string': _with(versions={'1': 'head_v1.npz'}), 'entry_number': _with(versions={'1': 5}),
    'key_not_int': _with(versions={'a': {}}), 'key_negative': _with(versions={'-1': {}}),
    'key_zero': _with(versions={'0': {}}), 'key_leading_zero': _with(versions={'01': {}}),
    'key_huge': _with(versions={'9' * 30: {}}), 'file_elsewhere': _with(versions={'1': {'file': '../x.npz'}}),
    'current_inf': b'{"current": 1e400, "accepted": [0], "versions": {}}',
    'current_true': _with(current=True), 'current_str': _with(current='x'),
    'current_float': _with(current=1.0),
    'current_negative': _with(current=-1), 'current_unregistered': _with(current=7),
    'current_missing': b'{"accepted": [0], "versions": {}}',
    'accepted_inf': b'{"current": 0, "accepted": [0, 1e400], "versions": {}}',
    'accepted_str': _with(accepted='0,1'), 'accepted_dict': _with(accepted={'0': 1}),
    'accepted_bool': _with(accepted=[0, True]), 'accepted_negative': _with(accepted=[0, -1]),
    'accepted_nan': b'{"current": 0, "accepted": [NaN], "versions": {}}',
    'deep_list': b'[' * 200_000, 'deep_object': b'{"a":' * 100_000,
    'long_integer': b'{"current": ' + b'9' * 5000 + b', "accepted": [0], "versions": {}}',
    'not_utf8': b'{"current": 0, "accepted": [0], "versions": {"1": "\xff\xfe"}}',
    'binary': bytes(range(256)), 'truncated': _with()[:40], 'too_large': b' ' * (MAX_INDEX_BYTES + 1),
}


@pytest.mark.parametrize('name', sorted(MALFORMED_INDEXES))
def test_malformed_index_is_one_bundle_error_and_start_up_uses_v0(toy, tmp_path, name):
    reg = HeadRegistry(load_bundle(toy, check_onnx=False), tmp_path / 'state', keep_versions=3)
    reg.dir.mkdir(parents=True)
    reg.index_path.write_bytes(MALFORMED_INDEXES[name])
    for call in (reg.index, reg.load, lambda: reg.load(1), reg.rollback, lambda: reg.activate(1),
                 lambda: reg.add(toy_head()), lambda: reg.current_version, reg.versions):
        with pytest.raises(BundleError, match='corrupt head index') as e:
            call()
        assert type(e.value) is BundleError and '\n' not in str(e.value)
    head, warn = reg.load_current_or_fallback()
    assert head.version == 0 and 'corrupt head index' in warn and 'bundle head (v0)' in warn
    assert reg.index_path.read_bytes() == MALFORMED_INDEXES[name]  # nothing rewrote it
    assert sorted(p.name for p in reg.dir.iterdir()) == ['.lock', 'index.json']  # add wrote no head file


def test_index_that_is_not_a_regular_file(toy, tmp_path):
    reg = HeadRegistry(load_bundle(toy, check_onnx=False), tmp_path / 'state')
    reg.dir.mkdir(parents=True)
    os.mkfifo(reg.index_path)  # reading a FIFO would block forever
    with pytest.raises(BundleError, match='not a regular file'):
        reg.index()
    assert reg.load_current_or_fallback()[0].version == 0
    reg.index_path.unlink()
    reg.index_path.mkdir()
    with pytest.raises(BundleError, match='corrupt head index'):
        reg.load()


def test_index_normalised_accepted_and_sha256_required(toy, tmp_path):
    reg = HeadRegistry(load_bundle(toy, check_onnx=False), tmp_path / 'state')
    reg.add(toy_head(permute=(2, 0, 1)))
    idx = reg.index()
    idx['accepted'] = [1, 99, 1]  # an unregistered version and no leading 0: normalised, not trusted
    reg.index_path.write_text(json.dumps(idx))
    assert reg.index()['accepted'] == [0, 1, 1] and reg.load().version == 1
    # an entry without sha256 (or with a malformed one) never loads, before its file is even read
    for sha in (None, 'abc', 5, 'A' * 64):
        register(reg, 2, toy_head(permute=(1, 2, 0)).to_bytes(), sha=None)
        if sha is not None:
            idx = reg.index()
            idx['versions']['2']['sha256'] = sha
            reg.index_path.write_text(json.dumps(idx))
        with pytest.raises(BundleError, match='no valid sha256'):
            reg.load(2)
        head, warn = reg.load_current_or_fallback()
        assert head.version == 1 and 'v2 unusable' in warn and 'sha256' in warn
    # the hash is checked before the file is parsed: a pickle with a wrong hash is a hash mismatch
    register(reg, 3, b'\x80\x04garbage', sha='0' * 64)
    with pytest.raises(BundleError, match='sha256 mismatch'):
        reg.load(3)
    for bad in (-1, 1.5, True, '1', 10**20):
        with pytest.raises(BundleError, match='head version must be an integer'):
            reg.load(bad)


# -- 2./3. head contents, class names --------------------------------------------------------------------
def _head_npz(**over):
    arrays = {'weight': np.ones((3, 8), np.float32), 'bias': np.zeros(3, np.float32),
              'class_names': np.array(TOY_CLASSES), 'version': np.int64(0)}
    arrays.update(over)
    return npz_bytes(**{k: v for k, v in arrays.items() if v is not None})


BAD_HEADS = {
    'weight_strings': (_head_npz(weight=np.full((3, 8), 'x')), 'must be numeric'),
    'weight_bytes': (_head_npz(weight=np.full((3, 8), b'x')), 'must be numeric'),
    'weight_complex': (_head_npz(weight=np.ones((3, 8), np.complex64)), 'must be numeric'),
    'weight_bool': (_head_npz(weight=np.ones((3, 8), bool)), 'must be numeric'),
    'weight_structured': (_head_npz(weight=np.zeros((3, 8), 'f4,f4')), 'must be numeric'),
    'weight_datetime': (_head_npz(weight=np.zeros((3, 8), 'M8[s]')), 'must be numeric'),
    'weight_0d': (_head_npz(weight=np.float32(1)), 'must be 2-D'),
    'weight_3d': (_head_npz(weight=np.ones((3, 8, 1), np.float32)), 'must be 2-D'),
    'weight_empty': (_head_npz(weight=np.ones((3, 0), np.float32)), 'must be 2-D'),
    'weight_f64_overflow': (_head_npz(weight=np.full((3, 8), 1e300)), 'NaN or Inf'),
    'bias_0d': (_head_npz(bias=np.float32(0)), 'must be 1-D'),
    'bias_2d': (_head_npz(bias=np.zeros((3, 1), np.float32)), 'must be 1-D'),
    'bias_strings': (_head_npz(bias=np.array(['a', 'b', 'c'])), 'must be numeric'),
    'names_numbers': (_head_npz(class_names=np.arange(3)), 'array of strings'),
    'names_bytes': (_head_npz(class_names=np.array([b'red', b'green', b'blue'])), 'array of strings'),
    'names_0d': (_head_npz(class_names=np.array('red')), 'array of strings'),
    'names_2d': (_head_npz(class_names=np.array([TOY_CLASSES])), 'array of strings'),
    'names_duplicate': (_head_npz(class_names=np.array(['red', 'green', 'red'])), 'more than once'),
    'names_empty': (_head_npz(class_names=np.array(['red', 'green', ''])), 'is empty'),
    'names_control': (_head_npz(class_names=np.array(['red', 'green', 'bl\nue'])), 'control characters'),
    'names_too_long': (_head_npz(class_names=np.array(['red', 'green', 'b' * 300])), 'longer than'),
    'version_string': (_head_npz(version=np.array('1')), None),  # the registry's version wins: loads
    'missing_bias': (_head_npz(bias=None), 'lacks'),
}


def test_bad_head_contents_are_bundle_errors_and_start_up_walks_back(toy, tmp_path):
    reg = HeadRegistry(load_bundle(toy, check_onnx=False), tmp_path / 'state')
    good = reg.add(toy_head(permute=(2, 0, 1)))
    for k, (name, (data, phrase)) in enumerate(BAD_HEADS.items()):
        v = 2 + k
        register(reg, v, data)
        head = one_line(reg.load, v)
        if phrase is None:
            assert head is not None and head.version == v, name
            continue
        with pytest.raises(BundleError, match=phrase) as e:
            reg.load(v)
        assert type(e.value) is BundleError, name
        # start-up: the previous good accepted version (walking back over every bad one in between)
        head, warn = reg.load_current_or_fallback()
        assert head.version in (good.version, 2 + list(BAD_HEADS).index('version_string')), name
        assert f'v{v} unusable' in warn and phrase in warn, (name, warn)
        # and a standalone head file gives the same error
        p = tmp_path / f'{name}.npz'
        p.write_bytes(data)
        with pytest.raises(BundleError, match=phrase):
            Head.load(p)


def test_head_constructor_validates_everything():
    w, b = np.ones((3, 8), np.float32), np.zeros(3, np.float32)
    bad = [((np.array([['a'] * 8] * 3)), b, TOY_CLASSES), ([[1, 2], [3]], b, TOY_CLASSES),
           (w, b, 'rgb'), (w, b, TOY_CLASSES[:2]), (w, b, (1, 2, 3)), (w, b, None), (w, b, np.array('red')),
           (w, b, ('red', 'green', None)), (w, np.zeros(4), TOY_CLASSES), (object(), b, TOY_CLASSES),
           (w.astype(np.complex128), b, TOY_CLASSES), (np.ones((3, 9000)), b, TOY_CLASSES)]
    for args in bad:
        with pytest.raises(BundleError):
            Head(*args)
    for version in (-1, 1.5, True, '2', 10**16):
        with pytest.raises(BundleError, match='version'):
            Head(w, b, TOY_CLASSES, version)
    h = Head(w.astype(np.float64), b.tolist(), np.array(TOY_CLASSES), np.int64(4))
    assert h.class_names == TOY_CLASSES and type(h.class_names[0]) is str and h.version == 4


def test_class_name_bounds():
    for ok in ('red', 'Vorfahrt gewähren', 'Speed limit (20km/h)', 'a' * MAX_CLASS_NAME_CHARS, '标志'):
        assert check_class_name(ok) is None, ok
    for bad, why in (('', 'empty'), ('   ', 'empty'), ('a' * (MAX_CLASS_NAME_CHARS + 1), 'longer'),
                     ('a\nb', 'control'), ('a\tb', 'control'), ('a\x00', 'control'),
                     ('\x1b[31mred', 'control'), ('a\u2028b', 'control'), ('\ud800', 'control'),
                     (5, 'not a string'), (None, 'not a string'), (b'red', 'not a string')):
        assert why in check_class_name(bad), bad
    names = [f'c{i}' for i in range(MAX_CLASSES + 1)]
    with pytest.raises(BundleError, match=f'must be 1..{MAX_CLASSES}'):
        Head(np.ones((len(names), 1), np.float32), np.zeros(len(names), np.float32), names)
    Head(np.ones((MAX_CLASSES, 1), np.float32), np.zeros(MAX_CLASSES, np.float32), names[:-1])


# -- 4. retention -----------------------------------------------------------------------------------------
def _files(reg):
    return sorted(int(p.name[6:-4]) for p in reg.dir.glob('head_v*.npz'))


def test_retention_keeps_current_rollback_target_and_v0(toy, tmp_path):
    b = load_bundle(toy, check_onnx=False)
    bundle_head = (toy / 'head.npz').read_bytes()
    reg = HeadRegistry(b, tmp_path / 'state', keep_versions=5)
    for i in range(30):
        reg.add(toy_head(scale=1.0 + i))
        idx = reg.index()
        assert len(idx['versions']) <= 5 and _files(reg) == sorted(int(v) for v in idx['versions'])
        assert all(v == 0 or str(v) in idx['versions'] for v in idx['accepted'])
    assert _files(reg) == [26, 27, 28, 29, 30] and reg.index()['accepted'] == [0, 26, 27, 28, 29, 30]
    assert reg.load().weight[0, 0] == toy_head(scale=30.0).weight[0, 0]
    # the whole rollback chain loads, down to the bundle head
    chain = [reg.rollback().version for _ in range(5)]
    assert chain == [29, 28, 27, 26, 0]
    with pytest.raises(BundleError, match='already at the first'):
        reg.rollback()
    assert (toy / 'head.npz').read_bytes() == bundle_head  # v0's file is never touched
    # protected beyond the count: the current version and its rollback target
    reg = HeadRegistry(b, tmp_path / 'state2', keep_versions=1)
    reg.add(toy_head(scale=2.0))
    reg.add(toy_head(scale=3.0))
    assert _files(reg) == [1, 2]  # 2 is current, 1 its rollback target
    reg.add(toy_head(scale=4.0), activate=False)  # 3: newest; 2 current; 1 its rollback target
    assert _files(reg) == [1, 2, 3]
    reg.add(toy_head(scale=5.0))  # 4 current, 2 its rollback target (3 was never accepted)
    assert _files(reg) == [2, 4] and reg.index()['accepted'] == [0, 2, 4]
    assert [reg.rollback().version, reg.rollback().version] == [2, 0]
    # 0 keeps everything
    reg = HeadRegistry(b, tmp_path / 'state3', keep_versions=0)
    for i in range(8):
        reg.add(toy_head(scale=1.0 + i))
    assert _files(reg) == list(range(1, 9))
    for bad in (-1, 1.5, 'x', True):
        with pytest.raises(ValueError, match='keep_versions'):
            HeadRegistry(b, tmp_path / 'state4', keep_versions=bad)


def test_retention_removes_only_old_stray_files_of_ours(toy, tmp_path):
    reg = HeadRegistry(load_bundle(toy, check_onnx=False), tmp_path / 'state', keep_versions=3)
    reg.add(toy_head())
    outside = tmp_path / 'outside.npz'
    outside.write_bytes(b'precious')
    old = os.stat(reg.index_path).st_mtime - 3600
    # name -> removed? Everything is an hour old except head_v98.npz (fresh: maybe a writer without our
    # lock); only our own names go, never a foreign file, a name that is not exactly ours or a symlink
    strays = {'head_v99.npz': True, '.head_v7.npz.ab_12.tmp': True, '.index.json.x9y8.tmp': True,
              'head_v98.npz': False, 'notes.txt': False, 'head_v01.npz': False, 'head_v5.npz.bak': False}
    for name in strays:
        (reg.dir / name).write_bytes(b'x')
        if name != 'head_v98.npz':
            os.utime(reg.dir / name, (old, old))
    (reg.dir / 'head_v97.npz').symlink_to(outside)
    os.utime(reg.dir / 'head_v97.npz', (old, old), follow_symlinks=False)
    reg.add(toy_head(scale=2.0))
    left = {p.name for p in reg.dir.iterdir()}
    assert left == {'.lock', 'index.json', 'head_v1.npz', 'head_v2.npz', 'head_v97.npz'} | {
        n for n, removed in strays.items() if not removed}
    assert outside.read_bytes() == b'precious'


# -- 5. ONNX external data --------------------------------------------------------------------------------
def test_onnx_external_data_must_be_covered_by_the_manifest(toy, tmp_path):
    onnx = pytest.importorskip('onnx')
    m = yaml.safe_load((toy / 'manifest.yaml').read_text())

    def save_external(model, location):
        onnx.save_model(model, str(toy / 'backbone.onnx'), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=location, size_threshold=0)

    save_external(onnx.load(str(toy / 'backbone.onnx')), 'w.bin')
    write_manifest(toy, m)  # hashes backbone.onnx, not w.bin
    with pytest.raises(BundleError, match="ONNX external data 'w.bin' of 'backbone.onnx' is not covered"):
        load_bundle(toy)
    write_manifest(toy, {**m, 'files': {**m['files'], 'backbone_data': 'w.bin'}})
    b = load_bundle(toy)  # covered and intact: ONNX Runtime loads it
    assert b.files['backbone_data'] == toy / 'w.bin'
    w = bytearray((toy / 'w.bin').read_bytes())
    w[5] ^= 0xFF
    (toy / 'w.bin').write_bytes(bytes(w))
    with pytest.raises(BundleError, match="sha256 mismatch for 'w.bin'"):
        load_bundle(toy)
    # a location outside the bundle (relative or absolute) is refused even without hashing
    model = onnx.load(str(toy / 'backbone.onnx'), load_external_data=False)
    outside = tmp_path / 'outside.bin'
    shutil.copy(toy / 'w.bin', outside)
    for loc in ('../outside.bin', str(outside), 'sub/../../outside.bin'):
        for t in model.graph.initializer:
            for e in t.external_data:
                if e.key == 'location':
                    e.value = loc
        (toy / 'backbone.onnx').write_bytes(model.SerializeToString())
        write_manifest(toy, {**m, 'files': {**m['files'], 'backbone_data': 'w.bin'}})
        for verify in (True, False):
            with pytest.raises(BundleError, match='lies outside the bundle'):
                load_bundle(toy, verify_hashes=verify)


def test_onnx_without_an_input_is_a_bundle_error(toy):
    onnx = pytest.importorskip('onnx')
    from onnx import TensorProto, helper, numpy_helper

    const = numpy_helper.from_array(np.zeros((1, 8), np.float32), 'c')
    graph = helper.make_graph([helper.make_node('Constant', [], ['features'], value=const)], 'noinput', [],
                              [helper.make_tensor_value_info('features', TensorProto.FLOAT, [1, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])
    model.ir_version = 8
    onnx.save(model, str(toy / 'backbone.onnx'))
    write_manifest(toy, yaml.safe_load((toy / 'manifest.yaml').read_text()))
    with pytest.raises(BundleError, match='needs exactly one input'):
        load_bundle(toy)


def test_shipped_models_need_no_onnx_parse(monkeypatch):
    """The cheap pre-check: no 'location' bytes, no external data, no onnx import on the robot path."""
    import builtins

    real = builtins.__import__

    def no_onnx(name, *a, **k):
        assert name != 'onnx', 'onnx imported for a model without external data'
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, '__import__', no_onnx)
    for name in ('gtsrb_student', 'gtsrb_teacher'):
        if (REPO / 'models' / name / 'manifest.yaml').exists():
            load_bundle(REPO / 'models' / name, check_onnx=False)


# -- 6. npz bombs and hostile zips ------------------------------------------------------------------------
def _zip(members: list[tuple[str, bytes]], method=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, 'w', method) as zf, warnings.catch_warnings():
        warnings.simplefilter('ignore')  # duplicate names are one of the hostile cases
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(a), allow_pickle=True)
    return buf.getvalue()


def _npy_header(shape, descr='<f8') -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {'descr': descr, 'fortran_order': False, 'shape': shape})
    return buf.getvalue()


def zip_bomb(name: str, inflated: int) -> bytes:
    """A real, valid zip whose one member ``name`` (an .npy of zeros) inflates to ``inflated`` bytes
    (a multiple of 16 MiB), written without ever holding more than 16 MiB: after a full flush deflate
    emits the same bytes for every further 16 MiB of zeros."""
    chunk = 1 << 24
    hdr = _npy_header((inflated // 8,))
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = co.compress(hdr) + co.flush(zlib.Z_FULL_FLUSH)
    zeros = bytes(chunk)
    block = co.compress(zeros) + co.flush(zlib.Z_FULL_FLUSH)
    body = head + block * (inflated // chunk) + co.flush()
    crc = zlib.crc32(hdr)
    for _ in range(inflated // chunk):
        crc = zlib.crc32(zeros, crc)
    size, fn = len(hdr) + inflated, name.encode()
    local = struct.pack('<4s5H3L2H', b'PK\x03\x04', 20, 0, 8, 0, 0x21, crc, len(body), size, len(fn), 0)
    central = struct.pack('<4s6H3L5H2L', b'PK\x01\x02', 20, 20, 0, 8, 0, 0x21, crc, len(body), size,
                          len(fn), 0, 0, 0, 0, 0, 0)
    cd_off = len(local) + len(fn) + len(body)
    end = struct.pack('<4s4H2LH', b'PK\x05\x06', 0, 0, 1, 1, len(central) + len(fn), cd_off, 0)
    return local + fn + body + central + fn + end


def test_npz_bomb_refused_before_inflating(toy, tmp_path):
    bomb = zip_bomb('weight.npy', 2 << 30)
    assert len(bomb) < 3 << 20
    p = tmp_path / 'bomb.npz'
    p.write_bytes(bomb)
    info = zipfile.ZipFile(p).infolist()[0]
    assert info.file_size > 2 << 30 and info.compress_type == zipfile.ZIP_DEFLATED  # it is a real bomb
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match='would inflate to 2147483') as e:
            load_npz(p)
        with pytest.raises(BundleError, match='would inflate to'):
            Head.load(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert 'refused npz file' in str(e.value) and peak < 32 << 20, peak
    # through the registry (hash matches: the bomb is caught by the size check)
    reg = HeadRegistry(load_bundle(toy, check_onnx=False), tmp_path / 'state')
    reg.add(toy_head())
    register(reg, 2, bomb)
    with pytest.raises(BundleError, match='would inflate'):
        reg.load(2)
    assert reg.load_current_or_fallback()[0].version == 1


def test_hostile_npz_members(tmp_path):
    good = [('weight.npy', _npy(np.ones((3, 8), np.float32))), ('bias.npy', _npy(np.zeros(3, np.float32))),
            ('class_names.npy', _npy(np.array(TOY_CLASSES)))]
    lie = _npy_header((10**12,)) + bytes(8)  # says 8 TB
    cases = {
        'header_lie': (_zip(good + [('x.npy', lie)]), 'header says shape'),
        'header_short': (_zip(good + [('x.npy', _npy_header((4,)) + bytes(8))]), 'header says shape'),
        'objects': (_zip(good + [('x.npy', _npy(np.array([{}], dtype=object)))]), 'allow_pickle=False'),
        'dotdot': (_zip([('../weight.npy', good[0][1])] + good[1:]), 'not a plain'),
        'subdir': (_zip([('a/weight.npy', good[0][1])] + good[1:]), 'not a plain'),
        'not_npy': (_zip(good + [('notes.txt', b'hello')]), 'not a plain'),
        'duplicate': (_zip(good + [good[0]]), 'not a plain, unique'),
        'bzip2': (_zip(good, zipfile.ZIP_BZIP2), 'compression'),
        'lzma': (_zip(good, zipfile.ZIP_LZMA), 'compression'),
        'many': (_zip(good + [(f'x{i}.npy', _npy(np.int8(0))) for i in range(70)]), 'members'),
        'too_big': (_zip([('weight.npy', _npy(np.ones((3, 300_000), np.float32)))] + good[1:]), 'more than'),
        'too_big_deflated': (_zip([('weight.npy', _npy(np.ones((3, 300_000), np.float32)))] + good[1:],
                                  zipfile.ZIP_DEFLATED), 'would inflate to'),
        'truncated': (_zip(good)[:300], 'not a valid npz'),
        'garbage': (b'PK\x03\x04' + bytes(random.Random(0).randbytes(500)), 'not a valid npz'),
    }
    for name, (data, phrase) in cases.items():
        p = tmp_path / f'{name}.npz'
        p.write_bytes(data)
        with pytest.raises(BundleError, match=phrase):
            Head.load(p, max_bytes=1 << 20)
    p = tmp_path / 'good.npz'
    p.write_bytes(_zip(good, zipfile.ZIP_DEFLATED))
    assert Head.load(p, max_bytes=1 << 20).class_names == TOY_CLASSES


# -- 7. heads/.lock and a symlinked heads directory ------------------------------------------------------
def test_lock_symlink_is_never_followed(toy, tmp_path):
    b = load_bundle(toy, check_onnx=False)
    before = outside_snapshot(tmp_path)
    target = tmp_path.parent / f'{tmp_path.name}-lock-target'  # outside tmp_path: must never appear
    reg = HeadRegistry(b, tmp_path / 'state')
    reg.dir.mkdir(parents=True)
    (reg.dir / '.lock').symlink_to(target)
    for call in (lambda: reg.add(toy_head()), reg.rollback, lambda: reg.activate(0)):
        with pytest.raises(BundleError, match='symbolic link'):
            call()
    assert not target.exists() and not os.path.lexists(target) and outside_snapshot(tmp_path) == before
    assert reg.load_current_or_fallback() == (b.head, None)  # reading needs no lock
    # a symlink to an existing file: refused too, the file untouched
    existing = tmp_path / 'precious'
    existing.write_bytes(b'keep')
    (reg.dir / '.lock').unlink()
    (reg.dir / '.lock').symlink_to(existing)
    with pytest.raises(BundleError, match='symbolic link'):
        reg.add(toy_head())
    assert existing.read_bytes() == b'keep'
    # a directory or a FIFO at .lock: refused, no hang
    (reg.dir / '.lock').unlink()
    (reg.dir / '.lock').mkdir()
    with pytest.raises(BundleError, match='not a regular file'):
        reg.add(toy_head())
    (reg.dir / '.lock').rmdir()
    os.mkfifo(reg.dir / '.lock')
    with pytest.raises(BundleError, match='not a regular file'):
        reg.add(toy_head())
    (reg.dir / '.lock').unlink()
    assert reg.add(toy_head()).version == 1 and (reg.dir / '.lock').is_file()


def test_symlinked_heads_directory(toy, tmp_path):
    b = load_bundle(toy, check_onnx=False)
    elsewhere = tmp_path / 'volume' / 'heads'
    elsewhere.mkdir(parents=True)
    (tmp_path / 'state').mkdir()
    (tmp_path / 'state' / 'heads').symlink_to(elsewhere)  # the operator's choice: followed
    reg = HeadRegistry(b, tmp_path / 'state')
    assert reg.add(toy_head(permute=(2, 0, 1))).version == 1
    assert (elsewhere / 'head_v1.npz').is_file() and reg.load().version == 1
    # dangling: no adapted heads; a write fails with the OS error and creates nothing at the target
    gone = tmp_path / 'gone'
    (tmp_path / 'state2').mkdir()
    (tmp_path / 'state2' / 'heads').symlink_to(gone)
    reg = HeadRegistry(b, tmp_path / 'state2')
    assert reg.load_current_or_fallback() == (b.head, None)
    with pytest.raises(OSError):
        reg.add(toy_head())
    assert not gone.exists()


# -- 8. linear fallback -----------------------------------------------------------------------------------
def test_fallback_over_many_missing_versions_reads_the_index_once(toy, tmp_path, monkeypatch):
    reg = HeadRegistry(load_bundle(toy, check_onnx=False), tmp_path / 'state')
    reg.dir.mkdir(parents=True)
    n = 2000
    reg.index_path.write_text(json.dumps({
        'current': n, 'accepted': list(range(n + 1)),
        'versions': {str(v): {'file': f'head_v{v}.npz', 'sha256': '0' * 64} for v in range(1, n + 1)}}))
    reads = []
    real = HeadRegistry._read_index
    monkeypatch.setattr(HeadRegistry, '_read_index', lambda self: (reads.append(1), real(self))[1])
    head, warn = reg.load_current_or_fallback()
    assert head.version == 0 and f'head v{n} unusable' in warn and 'is missing' in warn and 'using v0' in warn
    assert len(reads) == 1


# -- 9. manifest field types ------------------------------------------------------------------------------
MANIFEST_CASES = [
    (('input', 'std'), ['a', 'b', 'c']), (('input', 'std'), 5), (('input', 'std'), [1.0, 1.0]),
    (('input', 'std'), [1.0, 1.0, 0.0]), (('input', 'std'), [1.0, 1.0, 1e-30]),
    (('input', 'std'), [1.0, 1, 1e400]),
    (('input', 'std'), [1.0, 1.0, float('nan')]), (('input', 'std'), [True, 1.0, 1.0]),
    (('input', 'mean'), [0.0, 0.0, float('inf')]), (('input', 'mean'), [0.0, 0.0, 10**400]),
    (('input', 'mean'), {'r': 0}), (('input',), 5), (('input',), [16, 16]), (('input', 'height'), 'x'),
    (('input', 'height'), 0), (('input', 'width'), -3), (('input', 'width'), 16.0),
    (('input', 'width'), True),
    (('input', 'height'), 100_000), (('input', 'color_order'), ['rgb']), (('input', 'color_order'), 'RGB'),
    (('class_names',), 3), (('class_names',), ['red', 'green', 7]),
    (('class_names',), ['red', 'red', 'blue']),
    (('class_names',), []), (('class_names',), 'rgb'), (('class_names',), ['red', 'green', 'x\n']),
    (('files',), []), (('files',), {'backbone': 5, 'head': 'head.npz'}), (('files', 'head'), None),
    (('files', 'full'), '../toy2/full.onnx'), (('files', 'full'), '/etc/passwd'), (('files', 'anchor'), '.'),
    (('files', 'full'), 'a\\..\\b'), (('sha256',), []), (('sha256',), {'head.npz': 5}),
    (('sha256',), {'head.npz': 'abc'}), (('sha256',), {7: '0' * 64}), (('feature_size',), 'x'),
    (('feature_size',), True), (('feature_size',), -8), (('feature_size',), 1e400), (('feature_size',), 8.0),
    (('feature_size',), 10**30), (('name',), 5), (('name',), '../../etc'), (('name',), ''), (('name',), None),
    (('task',), ['classification']), (('format_version',), True), (('format_version',), 1.0),
    (('format_version',), [1]), (('format_version',), '1'),
]


def test_manifest_wrong_field_types_are_one_line_bundle_errors(toy):
    good = yaml.safe_load((toy / 'manifest.yaml').read_text())
    for path, value in MANIFEST_CASES:
        m = copy.deepcopy(good)
        node = m
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        (toy / 'manifest.yaml').write_text(yaml.safe_dump(m))
        with pytest.raises(BundleError) as e:
            load_bundle(toy)
        assert type(e.value) is BundleError and '\n' not in str(e.value), (path, value, e.value)
    for text in ('[' * 50_000, 'a: &x [*x]\n', 'created: 2026-13-45\n', '!!python/object:os.system {}\n',
                 '? [a]\n: b\n', 'x' * (5 << 20)):
        (toy / 'manifest.yaml').write_text(text)
        with pytest.raises(BundleError) as e:
            load_bundle(toy)
        assert '\n' not in str(e.value), (text[:20], e.value)
    (toy / 'manifest.yaml').write_text(yaml.safe_dump(good))
    assert load_bundle(toy).input_size == (16, 16)


# -- 10. seeded fuzz --------------------------------------------------------------------------------------
def _rand_scalar(rng: random.Random):
    return rng.choice([None, True, False, 0, 1, -1, 3, 2**63, 10**30, 0.5, -0.0, 1e-30, 1e300, float('inf'),
                       float('-inf'), float('nan'), '', 'x', '1', '01', '-1', '1e400', 'head_v1.npz', '../x',
                       '\x00', 'é' * 300, 'red', '0' * 64])


def _rand_value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 3 or r < 0.55:
        return _rand_scalar(rng)
    if r < 0.75:
        return [_rand_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    keys = ['current', 'accepted', 'versions', 'file', 'sha256', '1', '2', '3', '0', '-1', 'x', 'std']
    return {rng.choice(keys): _rand_value(rng, depth + 1) for _ in range(rng.randrange(5))}


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _mutate(obj, rng: random.Random, paths=None):
    """A deep copy of ``obj`` with 1-3 random changes: a node deleted, replaced (random value of another
    type, NaN/Inf/huge numbers, nested garbage) or a key added."""
    obj = copy.deepcopy(obj)
    for _ in range(rng.randint(1, 3)):
        candidates = [p for p in _paths(obj) if p]
        if paths and rng.random() < 0.6:
            candidates = [p for p in paths if _get(obj, p[:-1]) is not None] or candidates
        if not candidates:
            return _rand_value(rng)
        path = rng.choice(candidates)
        parent = _get(obj, path[:-1])
        if not isinstance(parent, (dict, list)):
            continue
        key = path[-1]
        op = rng.random()
        if op < 0.25 and isinstance(parent, dict):
            parent.pop(key, None)
        elif op < 0.3 and isinstance(parent, list) and parent:
            parent.pop(rng.randrange(len(parent)))
        elif isinstance(parent, dict) or (isinstance(key, int) and key < len(parent)):
            parent[key] = _rand_value(rng)
    return obj


def _get(obj, path):
    for k in path:
        try:
            obj = obj[k]
        except (KeyError, IndexError, TypeError):
            return None
    return obj


def test_fuzz_manifest_of_the_shipped_student(tmp_path):
    if not (STUDENT / 'manifest.yaml').exists():
        pytest.skip('shipped student bundle not present')
    assert sum(p.stat().st_size for p in STUDENT.iterdir()) < 8 << 20
    d = tmp_path / 'student'
    shutil.copytree(STUDENT, d)
    good = yaml.safe_load((d / 'manifest.yaml').read_text())
    files_before = {p.name: p.read_bytes() for p in d.iterdir() if p.name != 'manifest.yaml'}
    important = [('format_version',), ('name',), ('task',), ('class_names',), ('class_names', 0),
                 ('class_names', 42), ('input',), ('input', 'height'), ('input', 'width'),
                 ('input', 'color_order'), ('input', 'mean'), ('input', 'mean', 1), ('input', 'std'),
                 ('input', 'std', 2), ('feature_size',), ('files',), ('files', 'backbone'), ('files', 'head'),
                 ('files', 'anchor'), ('files', 'full'), ('sha256',), ('sha256', 'head.npz'),
                 ('sha256', 'backbone.onnx')]
    rng = random.Random(20240611)
    loaded = 0
    for i in range(300):
        m = _mutate(good, rng, important)
        text = yaml.safe_dump(m, allow_unicode=True) if i % 25 else rng.choice(
            ['[' * 20_000, '{a: ' * 5_000, yaml.safe_dump(good)[:rng.randrange(2000)], '\t\x00\x01'])
        (d / 'manifest.yaml').write_text(text)
        try:
            b = load_bundle(d, check_onnx=i % 10 == 0)
        except BundleError as e:
            assert type(e) is BundleError and '\n' not in str(e), (i, e)
            continue
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f'case {i}: {type(e).__name__}: {e}\n{text[:2000]}')
        loaded += 1
        h, w = b.input_size
        assert type(h) is int and type(w) is int and 1 <= h <= 8192 and 1 <= w <= 8192
        assert b.mean.shape == (3,) and b.std.shape == (3,) and np.isfinite(b.mean).all()
        assert np.isfinite(b.std).all() and (b.std > 0).all()
        assert b.color_order in ('rgb', 'bgr') and isinstance(b.name, str) and '/' not in b.name
        assert b.class_names == b.head.class_names and all(isinstance(c, str) for c in b.class_names)
        assert type(b.feature_size) is int and b.feature_size == b.head.feature_size
    assert 20 < loaded < 290, loaded  # both outcomes were exercised
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.name != 'manifest.yaml'} == files_before


def _check_index(idx):
    assert isinstance(idx, dict) and type(idx['current']) is int and idx['accepted'][0] == 0
    assert all(type(v) is int and (v == 0 or str(v) in idx['versions']) for v in idx['accepted'])
    assert idx['current'] == 0 or str(idx['current']) in idx['versions']
    assert all(isinstance(m, dict) and str(int(k)) == k for k, m in idx['versions'].items())


def test_fuzz_index_json(toy, tmp_path):
    before = outside_snapshot(tmp_path)
    sentinel = tmp_path / 'sentinel'
    sentinel.mkdir()
    (sentinel / 'keep').write_bytes(b'x')
    b = load_bundle(toy, check_onnx=False)
    reg = HeadRegistry(b, tmp_path / 'state', keep_versions=4)
    heads = {1: reg.add(toy_head(permute=(2, 0, 1))), 2: reg.add(toy_head(permute=(1, 2, 0)))}
    files = {p.name: p.read_bytes() for p in reg.dir.glob('head_v*.npz')}
    valid = reg.index()
    valid_bytes = json.dumps(valid).encode()
    rng = random.Random(7)
    specials = [b'[' * 100_000, b'{"versions": ' * 50_000, b'9' * 5000, b'\xff\xfe{}', b'', b'  ',
                b'{"current": 1e400, "accepted": [0], "versions": {}}', b'NaN', b'-Infinity']
    outcomes = {'ok': 0, 'error': 0}
    for i in range(400):
        r = rng.random()
        if r < 0.45:
            data = json.dumps(_mutate(valid, rng)).encode()
        elif r < 0.7:
            data = json.dumps(_rand_value(rng)).encode()
        elif r < 0.8:
            data = rng.randbytes(rng.randrange(200))
        elif r < 0.9:
            raw = bytearray(valid_bytes)
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            data = bytes(raw[:rng.randrange(len(raw) + 1)]) if rng.random() < 0.3 else bytes(raw)
        else:
            data = rng.choice(specials)
        reg.index_path.write_bytes(data)
        try:
            idx = one_line(reg.index)
            if idx is not None:
                _check_index(idx)
            outcomes['ok' if idx is not None else 'error'] += 1
            for call in (reg.load, lambda: reg.load(rng.choice([0, 1, 2, 3, 10**6]))):
                h = one_line(call)
                assert h is None or h is b.head or np.array_equal(h.weight, heads[h.version].weight)
            head, warn = reg.load_current_or_fallback()
            assert head.version in (0, 1, 2) and (warn is None or '\n' not in warn)
            if idx is not None and warn is None:
                assert head.version == idx['current']
            for call in (reg.rollback, lambda: reg.activate(rng.choice([0, 1, 2, 5, -1, True, 'x']))):
                h = one_line(call)
                assert h is None or h.version in (0, 1, 2)
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f'case {i}: {type(e).__name__}: {e}\n{data[:500]!r}')
    assert outcomes['ok'] > 20 and outcomes['error'] > 100, outcomes
    assert {p.name: p.read_bytes() for p in reg.dir.glob('head_v*.npz')} == files
    assert outside_snapshot(tmp_path) == before and [p.name for p in sentinel.iterdir()] == ['keep']
    assert {p.name for p in tmp_path.iterdir()} == {'toy', 'state', 'sentinel'}


def _rand_array(rng: random.Random):
    shape = rng.choice([(), (0,), (1,), (3,), (4,), (3, 8), (4, 8), (3, 16), (2, 8), (3, 8, 1), (3, 0)])
    n = math.prod(shape)
    kind = rng.choice(['f4', 'f8', 'f2', 'i8', 'u1', 'b1', 'c8', 'U', 'S', 'O', 'V', 'M8[s]', 'f4,i4'])
    if kind == 'U':
        pool = list(TOY_CLASSES) + ['', 'x\n', 'a' * 300, 'red', 'new']
        return np.array([rng.choice(pool) for _ in range(n)] or [], dtype=str).reshape(shape)
    if kind == 'S':
        return np.array([b'red'] * n, dtype='S3').reshape(shape)
    if kind == 'O':
        return np.array([None] * n, dtype=object).reshape(shape)
    if kind == 'V':
        return np.zeros(shape, 'V4')
    vals = [rng.choice([0.0, 1.0, -2.5, 1e300, float('nan'), float('inf'), 7.0]) for _ in range(n)]
    with np.errstate(all='ignore'):
        if kind in ('M8[s]', 'f4,i4'):
            return np.zeros(shape, kind)
        return np.array(vals, dtype=np.float64).astype(kind).reshape(shape)


def _rand_head_file(rng: random.Random, valid: bytes) -> bytes:
    r = rng.random()
    if r < 0.45:  # random arrays of random dtypes / shapes / names
        arrays = {'weight': np.ones((3, 8), np.float32), 'bias': np.zeros(3, np.float32),
                  'class_names': np.array(TOY_CLASSES), 'version': np.int64(3)}
        for _ in range(rng.randint(1, 3)):
            k = rng.choice(['weight', 'bias', 'class_names', 'version', 'extra'])
            if rng.random() < 0.2:
                arrays.pop(k, None)
            else:
                arrays[k] = _rand_array(rng)
        buf = io.BytesIO()
        (np.savez_compressed if rng.random() < 0.3 else np.savez)(buf, **arrays)
        return buf.getvalue()
    if r < 0.6:  # truncated
        return valid[:rng.randrange(len(valid))]
    if r < 0.8:  # bit flips
        raw = bytearray(valid)
        for _ in range(rng.randint(1, 8)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        return bytes(raw)
    if r < 0.9:  # hostile zip structure
        good = list(zipfile.ZipFile(io.BytesIO(valid)).infolist())
        z = zipfile.ZipFile(io.BytesIO(valid))
        members = [(i.filename, z.read(i)) for i in good]
        choice = rng.randrange(5)
        if choice == 0:
            bad_name = rng.choice(['../weight.npy', 'a/weight.npy', 'weight', '/weight.npy'])
            members[0] = (bad_name, members[0][1])
        elif choice == 1:
            members.append(('x.npy', _npy_header((rng.choice([10**9, 10**15, 3]),)) + bytes(16)))
        elif choice == 2:
            members += [(f'm{j}.npy', _npy(np.int8(j))) for j in range(rng.randint(60, 90))]
        elif choice == 3:
            members.append(members[rng.randrange(len(members))])
        else:
            members.append(('x.npy', _npy(np.array([1], dtype=object))))
        method = rng.choice([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
        return _zip(members, method)
    if r < 0.93:
        return zip_bomb(rng.choice(['weight.npy', 'bias.npy']), 64 << 20)
    return b'PK\x03\x04' + rng.randbytes(rng.randrange(400))


def test_fuzz_head_files(toy, tmp_path):
    before = outside_snapshot(tmp_path)
    b = load_bundle(toy, check_onnx=False)
    reg = HeadRegistry(b, tmp_path / 'state')
    reg.add(toy_head(permute=(2, 0, 1)))
    v2 = reg.add(toy_head(permute=(1, 2, 0)))
    valid = toy_head(permute=(0, 2, 1), version=3).to_bytes()
    rng = random.Random(11)
    outcomes = {'ok': 0, 'error': 0}
    for i in range(400):
        data = _rand_head_file(rng, valid)
        register(reg, 3, data, sha='auto')
        try:
            h = one_line(reg.load, 3)
            outcomes['ok' if h is not None else 'error'] += 1
            if h is not None:
                assert h.version == 3 and h.feature_size == 8 and h.class_names[:3] == TOY_CLASSES
                assert np.isfinite(h.weight).all() and h.weight.dtype == np.float32
            head, warn = reg.load_current_or_fallback()
            if h is None:
                assert head.version == 2 and np.array_equal(head.weight, v2.weight) and 'v3 unusable' in warn
            else:
                assert head.version == 3 and warn is None
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f'case {i}: {type(e).__name__}: {e}')
    assert outcomes['ok'] > 5 and outcomes['error'] > 200, outcomes
    assert outside_snapshot(tmp_path) == before
    assert {p.name for p in reg.dir.iterdir()} == {'.lock', 'index.json', 'head_v1.npz', 'head_v2.npz',
                                                   'head_v3.npz'}
    assert bundle_mod.sha256_file(toy / 'head.npz') == yaml.safe_load((toy / 'manifest.yaml').read_text())[
        'sha256']['head.npz']
