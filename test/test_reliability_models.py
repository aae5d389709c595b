"""Bad models and bad parameters.

- Start-up: ``perception_node`` (the console script and ``python -m``) and ``adaptation_node`` with a
  broken bundle (missing, truncated ONNX, wrong input shape, class count != manifest, hash mismatch, a
  pickle as head, an npz with pickled object arrays, incompatible manifest version, invalid YAML, ...) or
  a bad parameter exit non-zero with ONE clear line (no traceback); nothing is ever unpickled.
- Run time: a corrupt head version (each corruption type) is refused through ``~/reload_head`` and through
  the ``head_version`` parameter (set over rcl_interfaces/srv/SetParameters from another node); the
  current head stays and keeps classifying.
- Parameters of both nodes, set over the real SetParameters service: out of range, wrong type, read-only
  (unknown execution provider, non-existent paths), unknown names: rejected with a reason, previous value
  kept (read back over GetParameters).
"""

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from edge_tl_ros.atomic import npz_bytes
from edge_tl_ros.bundle import HeadRegistry, load_bundle, write_manifest
from edge_tl_ros.toy import TOY_CLASSES, make_toy_bundle, toy_head

REPO = Path(__file__).resolve().parents[1]


class _Evil:
    """Unpickling this creates the file MARKER: proof that nothing was unpickled if it never appears."""

    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), 'w'))


def evil_pickle(marker: Path) -> bytes:
    _Evil.marker = marker
    return pickle.dumps(_Evil())


def evil_object_npz(marker: Path) -> bytes:
    _Evil.marker = marker
    buf = io.BytesIO()
    np.savez(buf, weight=np.array([_Evil()], dtype=object), bias=np.zeros(3, np.float32),
             class_names=np.array(TOY_CLASSES))
    return buf.getvalue()


def _manifest(d):
    return yaml.safe_load((d / 'manifest.yaml').read_text())


def make_bad_bundles(root: Path, marker: Path) -> dict:
    """name -> (bundle dir, a phrase the one-line error must contain)."""
    good = make_toy_bundle(root / 'good')
    out = {}

    def clone(name, phrase):
        d = root / name
        shutil.copytree(good, d)
        out[name] = (d, phrase)
        return d

    out['missing_dir'] = (root / 'does_not_exist', 'not found')
    d = clone('no_manifest', 'no manifest.yaml')
    (d / 'manifest.yaml').unlink()
    d = clone('missing_backbone', "'backbone.onnx' (backbone) listed in manifest.yaml is missing")
    (d / 'backbone.onnx').unlink()
    d = clone('truncated_onnx', 'cannot be loaded by ONNX Runtime')
    b = (d / 'backbone.onnx').read_bytes()
    (d / 'backbone.onnx').write_bytes(b[:len(b) // 2])
    write_manifest(d, _manifest(d))  # hashes match: the ONNX check itself must catch it
    d = clone('truncated_onnx_hash', 'sha256 mismatch')
    (d / 'backbone.onnx').write_bytes(b[:len(b) // 2])
    d = clone('wrong_input_shape', 'does not match manifest input')
    m = _manifest(d)
    m['input']['height'] = m['input']['width'] = 32
    write_manifest(d, m)
    d = clone('class_count', 'manifest lists 4')
    m = _manifest(d)
    m['class_names'] = [*TOY_CLASSES, 'yellow']
    write_manifest(d, m)
    d = clone('feature_size', 'feature_size')
    m = _manifest(d)
    m['feature_size'] = 16
    write_manifest(d, m)
    d = clone('hash_mismatch', 'sha256 mismatch')
    toy_head(permute=(1, 0, 2)).save(d / 'head.npz')
    d = clone('pickle_head', 'refusing to unpickle')
    (d / 'head.npz').write_bytes(evil_pickle(marker))
    write_manifest(d, _manifest(d))
    d = clone('object_array_head', 'allow_pickle=False')
    (d / 'head.npz').write_bytes(evil_object_npz(marker))
    write_manifest(d, _manifest(d))
    d = clone('nan_head', 'NaN')
    (d / 'head.npz').write_bytes(npz_bytes(weight=np.full((3, 8), np.nan, np.float32),
                                           bias=np.zeros(3, np.float32), class_names=np.array(TOY_CLASSES)))
    write_manifest(d, _manifest(d))
    d = clone('manifest_version', 'format_version 2 is not supported')
    m = _manifest(d)
    m['format_version'] = 2
    write_manifest(d, m)
    d = clone('invalid_yaml', 'invalid YAML at line')
    (d / 'manifest.yaml').write_text('name: [unclosed\n  files: {\n')
    d = clone('binary_manifest', 'cannot read the manifest')
    (d / 'manifest.yaml').write_bytes(bytes(range(256)))
    # wrong field types and values printed tracebacks (TypeError) or passed and gave NaN at run time
    for name, key, value, phrase in (('std_strings', 'std', ['a', 'b', 'c'], 'std must be 3 finite values'),
                                     ('std_subnormal', 'std', [1e-45, 1.0, 1.0], 'std > 0 (1e-6..1e6)'),
                                     ('input_int', None, 5, 'input must be a mapping'),
                                     ('class_names_int', 'class_names', 3, 'class_names must be a list')):
        d = clone(name, phrase)
        m = _manifest(d)
        if key == 'std':
            m['input']['std'] = value
        else:
            m[key or 'input'] = value
        write_manifest(d, m)
    return out


def run_all(cmds, env, timeout=120):
    """Start all commands at once (2 cores: start-up dominates), return (rc, output) per command."""
    procs = [subprocess.Popen(c, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for c in cmds]
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
            text = 'TIMEOUT (the node started?)\n' + text
        out.append((p.returncode, text))
    return out


def test_startup_failures_exit_with_one_clear_line(tmp_path, ros_domain):
    marker = tmp_path / 'UNPICKLED'
    bad = make_bad_bundles(tmp_path / 'bundles', marker)
    good = tmp_path / 'bundles' / 'good'
    # these processes never talk to each other: UDP only. 15 participants starting at once on 2 busy cores
    # over Fast DDS shared memory is a known way to stall a start (ros2/rmw_fastrtps#860); one full-suite
    # run here saw a start print nothing for 120 s
    env = dict(os.environ, ROS_DOMAIN_ID=str(ros_domain), PYTHONPATH=str(REPO),
               FASTDDS_BUILTIN_TRANSPORTS='UDPv4')
    script = Path(sys.executable).parent / 'perception_node'
    module = [sys.executable, '-m', 'edge_tl_ros.nodes.perception_node']
    perception = [str(script)] if script.exists() else module
    adaptation = [sys.executable, '-m', 'edge_tl_ros.nodes.adaptation_node']
    state = ['-p', f'state_dir:={tmp_path / "state"}']
    # every corruption in-process: one clear line (the message has no line break) naming the problem
    from edge_tl_ros.bundle import BundleError
    from edge_tl_ros.nodes.params import one_line

    for name, (d, phrase) in bad.items():
        with pytest.raises(BundleError) as e:
            load_bundle(d)
        assert '\n' not in str(e.value) and phrase in one_line(e.value), (name, str(e.value))
    # the processes (2 cores: each start costs ~1 s of CPU, so the list, not every variant)
    cases = []  # (command, phrase)
    as_process = ('missing_dir', 'missing_backbone', 'truncated_onnx', 'wrong_input_shape', 'class_count',
                  'hash_mismatch', 'pickle_head', 'manifest_version', 'invalid_yaml', 'std_strings',
                  'std_subnormal')
    for k, name in enumerate(as_process):
        cmd = perception if k % 2 else module  # both entry points, alternating
        cases.append(([*cmd, '--ros-args', '-p', f'model_bundle:={bad[name][0]}', *state], bad[name][1]))
    params = [('execution_provider:=foo', "unknown execution provider 'foo'"),
              ('num_threads:=0', 'out of range'), ('top_k:=abc', "expecting type 'INTEGER'")]
    for p, phrase in params:
        cases.append(([*module, '--ros-args', '-p', f'model_bundle:={good}', *state, '-p', p], phrase))
    cases.append(([*adaptation, '--ros-args', '-p', f'model_bundle:={bad["object_array_head"][0]}', *state],
                  bad['object_array_head'][1]))
    for p, phrase in (('labels.sources:=[oracle]', 'labels.sources'),
                      ('store.max_entries:=zero', "expecting type 'INTEGER'")):
        cases.append(([*adaptation, '--ros-args', '-p', f'model_bundle:={good}', *state, '-p', p], phrase))
    results = run_all([c for c, _ in cases], env)
    for (cmd, phrase), (rc, text) in zip(cases, results):
        lines = [ln for ln in text.splitlines() if ln.strip()]
        assert rc not in (0, None) and len(lines) == 1, (cmd[-3:], rc, text)
        assert 'cannot start:' in lines[0] and phrase in lines[0], (phrase, lines[0])
        assert 'Traceback' not in text
    assert not marker.exists(), 'a pickle was unpickled'


# -- run time: corrupt head versions ----------------------------------------------------------------------
rclpy = pytest.importorskip('rclpy')
from rcl_interfaces.msg import ParameterType  # noqa: E402
from rcl_interfaces.srv import GetParameters, SetParameters  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from test_perception_node import Harness, frame  # noqa: E402


def _call(node, client, request, timeout=10.0):
    assert client.wait_for_service(timeout_sec=timeout), client.srv_name
    fut = client.call_async(request)
    deadline = time.monotonic() + timeout
    while not fut.done() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fut.done(), f'{client.srv_name} did not answer'
    return fut.result()


class ParamRemote:
    """SetParameters / GetParameters of another node, called over DDS from ``node``."""

    def __init__(self, node, target: str):
        self.node = node
        self.set_cli = node.create_client(SetParameters, f'{target}/set_parameters')
        self.get_cli = node.create_client(GetParameters, f'{target}/get_parameters')

    def set(self, name, value):
        req = SetParameters.Request(parameters=[Parameter(name, value=value).to_parameter_msg()])
        return _call(self.node, self.set_cli, req).results[0]

    def get(self, name):
        vals = _call(self.node, self.get_cli, GetParameters.Request(names=[name])).values
        if not vals:
            raise KeyError(name)
        v = vals[0]
        return {ParameterType.PARAMETER_INTEGER: lambda: v.integer_value,
                ParameterType.PARAMETER_DOUBLE: lambda: v.double_value,
                ParameterType.PARAMETER_STRING: lambda: v.string_value,
                ParameterType.PARAMETER_BOOL: lambda: v.bool_value,
                ParameterType.PARAMETER_INTEGER_ARRAY: lambda: list(v.integer_array_value),
                ParameterType.PARAMETER_STRING_ARRAY: lambda: list(v.string_array_value),
                ParameterType.PARAMETER_DOUBLE_ARRAY: lambda: list(v.double_array_value)}[v.type]()


def register_raw(reg: HeadRegistry, version: int, data: bytes | None, sha: str | None = 'auto'):
    """Register ``data`` as head ``version`` and make it current, bypassing HeadRegistry.add's checks
    (what a damaged disk, a bad copy or a foreign tool could leave). ``data=None``: no file at all."""
    reg.dir.mkdir(parents=True, exist_ok=True)
    p = reg.dir / f'head_v{version}.npz'
    if data is not None:
        p.write_bytes(data)
    elif p.exists():
        p.unlink()
    idx = reg.index()
    if sha == 'auto':
        sha = hashlib.sha256(data or b'').hexdigest()
    idx['versions'][str(version)] = {'file': p.name, 'created': time.time(), 'metrics': {}, 'sha256': sha}
    if version not in idx['accepted']:
        idx['accepted'].append(version)
    idx['current'] = version
    (reg.dir / 'index.json').write_text(json.dumps(idx))


def corrupt_heads(marker: Path) -> dict:
    """name -> (bytes or None, sha ('auto' = matching), phrase of the refusal)."""
    good = toy_head(permute=(0, 2, 1)).to_bytes()
    wrong_classes = npz_bytes(weight=np.ones((2, 8), np.float32), bias=np.zeros(2, np.float32),
                              class_names=np.array(['cat', 'dog']))
    wrong_features = npz_bytes(weight=np.ones((3, 16), np.float32), bias=np.zeros(3, np.float32),
                               class_names=np.array(TOY_CLASSES))
    mismatch = npz_bytes(weight=np.ones((4, 8), np.float32), bias=np.zeros(3, np.float32),
                         class_names=np.array(TOY_CLASSES))
    nan = npz_bytes(weight=np.full((3, 8), np.inf, np.float32), bias=np.zeros(3, np.float32),
                    class_names=np.array(TOY_CLASSES))
    return {
        'missing_file': (None, 'auto', 'is missing'),
        'truncated': (good[:len(good) // 2], 'auto', 'not a valid npz'),
        'hash_mismatch': (good, hashlib.sha256(b'other').hexdigest(), 'sha256 mismatch'),
        'pickle': (evil_pickle(marker), 'auto', 'refusing to unpickle'),
        'object_arrays': (evil_object_npz(marker), 'auto', 'allow_pickle=False'),
        'wrong_classes': (wrong_classes, 'auto', 'class names do not start'),
        'wrong_feature_size': (wrong_features, 'auto', 'expects 16 features'),
        'rows_vs_biases': (mismatch, 'auto', 'must agree'),
        'inf_weights': (nan, 'auto', 'NaN or Inf'),
        'garbage': (b'PK\x03\x04' + os.urandom(200), 'auto', 'not a valid npz'),
    }


def test_corrupt_heads_refused_by_reload_and_head_version(ros_context, tmp_path):
    marker = tmp_path / 'UNPICKLED'
    toy = make_toy_bundle(tmp_path / 'toy')
    state = tmp_path / 'state'
    reg = HeadRegistry(load_bundle(toy), state)
    reg.add(toy_head(permute=(2, 0, 1)))  # v1: red frames -> 'green' (shows which head is in use)
    h = Harness(ros_context, toy, state)
    remote = ParamRemote(h.io, '/perception')
    try:
        assert h.node.head_version == 1 and h.classify('red') == 'green'
        good_index = (reg.dir / 'index.json').read_text()
        for k, (name, (data, sha, phrase)) in enumerate(corrupt_heads(marker).items()):
            version = 10 + k
            register_raw(reg, version, data, sha)
            r = h.call(h.reload)
            assert not r.success and 'keeping head v1' in r.message and phrase in r.message, (name, r.message)
            assert h.node.head_version == 1 and h.classify('red') == 'green', name
            # the same version asked for by parameter, over the SetParameters service
            res = remote.set('head_version', version)
            assert not res.successful and phrase in res.reason, (name, res.reason)
            assert remote.get('head_version') == -1 and h.node.head_version == 1
            assert h.classify('red') == 'green'
            (reg.dir / 'index.json').write_text(good_index)
        # a registered version that was never written, and one that is not registered at all
        res = remote.set('head_version', 999)
        assert not res.successful and 'not registered' in res.reason
        # a corrupt index: reload refused with the reason, head stays
        (reg.dir / 'index.json').write_text('{"current": 3, "acc')
        r = h.call(h.reload)
        assert not r.success and 'corrupt head index' in r.message and h.node.head_version == 1
        (reg.dir / 'index.json').write_text(good_index)
        # and a good version still loads through both paths afterwards
        assert remote.set('head_version', 0).successful and h.classify('red') == 'red'
        r = h.call(h.reload)
        assert r.success and h.node.head_version == 1
    finally:
        h.close()
    assert not marker.exists(), 'a pickle was unpickled'


def test_perception_parameters_over_the_service(ros_context, tmp_path):
    toy = make_toy_bundle(tmp_path / 'toy')
    h = Harness(ros_context, toy, tmp_path / 'state')
    remote = ParamRemote(h.io, '/perception')
    try:
        before = {n: remote.get(n) for n in ('top_k', 'score_threshold', 'max_image_pixels', 'head_version',
                                             'roi', 'execution_provider', 'model_bundle', 'state_dir',
                                             'deployment_mode', 'num_threads')}
        bad = [('top_k', 0), ('top_k', 101), ('top_k', 'three'), ('top_k', 2.5), ('score_threshold', 1.5),
               ('score_threshold', -0.1), ('score_threshold', 'x'), ('max_image_pixels', 0),
               ('head_version', -2), ('head_version', 7), ('roi', [1, 2, 3]), ('roi', [0, 0, -1, 0]),
               ('roi', ['a', 'b', 'c', 'd']), ('roi', 5),
               ('execution_provider', 'foo'), ('execution_provider', 'cuda'),
               ('model_bundle', str(tmp_path / 'nope')), ('state_dir', '/nonexistent/dir'),
               ('deployment_mode', 'full'), ('num_threads', 4), ('publish_debug_image', 'yes')]
        for name, value in bad:
            res = remote.set(name, value)
            assert not res.successful and res.reason, (name, value)
        res = remote.set('no_such_parameter', 1)
        assert not res.successful and 'undeclared' in res.reason
        assert {n: remote.get(n) for n in before} == before
        assert h.classify('blue') == 'blue' and len(h.results[-1].results) == 3
        # good values through the same path apply
        assert remote.set('top_k', 1).successful and remote.get('top_k') == 1
        assert remote.set('roi', [0, 0, 8, 8]).successful
        r = h.send(h.image_msg(frame('blue')))
        assert len(r.results) == 1 and r.results[0].class_id == 'blue'
    finally:
        h.close()


def test_adaptation_parameters_over_the_service(ros_context, tmp_path):
    from test_adaptation_node import make_node, spin

    toy = make_toy_bundle(tmp_path / 'toy')
    node = make_node(ros_context, toy, tmp_path / 'state')
    io_node = rclpy.create_node('param_io', context=ros_context)
    ex, _ = spin(ros_context, node, io_node)
    remote = ParamRemote(io_node, '/adaptation')
    try:
        names = ('store.max_entries', 'accept.margin', 'labels.sources', 'advanced.selection',
                 'perception_node', 'teacher_bundle', 'store.dir', 'model_bundle', 'store.sample_rate_hz',
                 'accept.holdout_fraction', 'advanced.round_timeout_s', 'round.min_labelled',
                 'store.keep_fraction', 'advanced.nice_level', 'advanced.crop_size')
        before = {n: remote.get(n) for n in names}
        bad = [('store.max_entries', 0), ('store.max_entries', 'many'), ('accept.margin', 5.0),
               ('accept.margin', 'x'), ('labels.sources', ['oracle']), ('labels.sources', []),
               ('labels.sources', ['topic', 'topic']), ('labels.sources', 'topic'),
               ('advanced.selection', 'greedy'), ('perception_node', 'not a name'),
               ('teacher_bundle', str(tmp_path / 'nope')), ('store.dir', '/nonexistent'),
               ('model_bundle', str(tmp_path / 'nope')), ('store.sample_rate_hz', -1.0),
               ('accept.holdout_fraction', 0.95), ('advanced.round_timeout_s', 0.0),
               ('round.min_labelled', 1), ('store.keep_fraction', 1.5), ('advanced.nice_level', 20),
               ('advanced.crop_size', 32)]
        for name, value in bad:
            res = remote.set(name, value)
            assert not res.successful and res.reason, (name, value)
        assert {n: remote.get(n) for n in names} == before
        assert node.round_cfg.margin == before['accept.margin'] and node.store.max_entries == 2000
        assert remote.set('store.max_entries', 100).successful and node.store.max_entries == 100
        assert remote.set('labels.sources', ['topic', 'self']).successful
        assert node.round_cfg.label_sources == ('topic', 'self')
    finally:
        ex.shutdown()
        node.destroy_node()
        io_node.destroy_node()


def test_engine_provider_fallback_and_unknown(tmp_path):
    """An unavailable provider falls back to CPU; an unknown name is refused with the choices."""
    import onnxruntime as ort

    from edge_tl_ros.engine import Engine, EngineError

    b = load_bundle(make_toy_bundle(tmp_path / 'toy'))
    if 'CUDAExecutionProvider' not in ort.get_available_providers():
        assert Engine(b, provider='cuda').provider == 'CPUExecutionProvider'
    with pytest.raises(EngineError, match="unknown execution provider 'npu'"):
        Engine(b, provider='npu')



def test_bundle_damaged_while_the_adaptation_node_runs(ros_context, tmp_path):
    """The bundle's head file is damaged under a running adaptation node: its rounds fail with the reason
    (the worker validates the bundle), the node keeps going, and once the file is back rounds work again.
    (Regression: a rejected round followed by a failed one logged from one call site at two severities,
    rclpy raised "Logger severity cannot be changed" and every later round crashed uncounted.)"""
    from test_adaptation_node import make_node, spin, wait_for

    toy = make_toy_bundle(tmp_path / 'toy')
    node = make_node(ros_context, toy, tmp_path / 'state')
    ex, _ = spin(ros_context, node)
    head = toy / 'head.npz'
    good = head.read_bytes()
    try:
        reasons = []
        for k, damaged in enumerate((False, True, True, False)):
            head.write_bytes(good[:100] if damaged else good)
            assert node.start_round('test')[0]
            assert wait_for(lambda: node.rounds == k + 1 and not node.round_running, 60), node.status()
            last = node.last_round
            reasons.append(last['reason'])
            assert not last['accepted']
            if damaged:
                assert last['failed'] and 'sha256 mismatch' in last['reason'], last
            else:
                assert not last.get('failed') and 'not enough labelled frames' in last['reason'], last
        assert not any('Logger severity' in r for r in reasons), reasons
        assert node.engine.head.version == 0
    finally:
        head.write_bytes(good)
        ex.shutdown()
        node.destroy_node()
