"""Fleet learning: aggregation math, a real Flower server with robot clients on loopback, what leaves a
robot (every message a client sends, inspected), and the robot's gate for a fleet head (+ registry)."""

import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from edge_tl_ros.adapt import AdaptConfig, run_round
from edge_tl_ros.bundle import Head, HeadRegistry, load_bundle
from edge_tl_ros.fleet.gate import gate_fleet_head
from edge_tl_ros.fleet.update import Update, aggregate, align_head, dp_update
from edge_tl_ros.headtrain import accuracy, train_head
from edge_tl_ros.toy import TOY_CLASSES, TOY_FEATURES, make_toy_bundle, toy_features, toy_frames, toy_head

pytest.importorskip('flwr')
REPO = Path(__file__).resolve().parents[1]


def _head(rng, classes=TOY_CLASSES, scale=1.0):
    return Head(rng.normal(0, scale, (len(classes), TOY_FEATURES)).astype(np.float32),
                rng.normal(0, scale, len(classes)).astype(np.float32), tuple(classes))


def _wait_listening(port: int, proc, timeout: float = 60.0) -> None:
    """Until something accepts TCP connections on ``port`` (the grpc-bidi client does not retry a
    refused first connection; the node's fleet worker retries with backoff)."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.stdout.read()[-2000:]
        with socket.socket() as s:
            if s.connect_ex(('127.0.0.1', port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f'nothing listens on {port}')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


# -- aggregation -------------------------------------------------------------------------------------------
def test_mean_is_weighted_by_trusted_labels_only():
    rng = np.random.default_rng(0)
    a, b = _head(rng), _head(rng)
    ua = Update.from_head(a, {'topic': 20, 'teacher': 10, 'self': 1000})  # self labels carry no weight
    ub = Update.from_head(b, {'teacher': 10})
    info = {}
    f = aggregate([ua, ub], None, 'mean', clip=0, info=info)
    np.testing.assert_allclose(f.weight, 0.75 * a.weight + 0.25 * b.weight, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f.bias, 0.75 * a.bias + 0.25 * b.bias, rtol=1e-5, atol=1e-6)
    assert info['weights'] == [30.0, 10.0] and info['trusted'] == [30, 10] and f.class_names == TOY_CLASSES


def test_class_alignment_across_robots_with_different_class_sets():
    rng = np.random.default_rng(1)
    a = _head(rng)
    b = _head(rng, ('blue', 'red', 'green', 'purple'))  # other order + a class only b knows
    f = aggregate([Update.from_head(a, {'topic': 10}), Update.from_head(b, {'topic': 10})], None, 'mean',
                  clip=0, first_classes=TOY_CLASSES)
    assert f.class_names == TOY_CLASSES + ('purple',)
    pos_b = {c: k for k, c in enumerate(b.class_names)}
    for k, c in enumerate(TOY_CLASSES):
        np.testing.assert_allclose(f.weight[k], (a.weight[k] + b.weight[pos_b[c]]) / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f.weight[3], b.weight[pos_b['purple']], rtol=1e-5, atol=1e-6)
    # a robot takes the fleet head with its own classes first, in its order
    g = align_head(f, b.class_names)
    assert g.class_names == b.class_names
    np.testing.assert_allclose(g.weight[0], f.weight[2])


@pytest.mark.parametrize('method,clip', [('mean', None), ('median', 0), ('trimmed', 0)])
def test_robust_aggregation_survives_a_poisoned_robot(method, clip):
    rng = np.random.default_rng(2)
    ref = toy_head()
    honest = [Head(ref.weight + rng.normal(0, 0.05, ref.weight.shape).astype(np.float32),
                   ref.bias + rng.normal(0, 0.05, 3).astype(np.float32), TOY_CLASSES) for _ in range(3)]
    poisoned = Head(-50 * ref.weight, 50 * np.ones(3, np.float32), TOY_CLASSES)  # sign-flipped, huge
    ups = [Update.from_head(h, {'topic': 100}) for h in honest]
    ups.append(Update.from_head(poisoned, {'topic': 1000}))
    plain = aggregate(ups, ref, 'mean', clip=0)
    robust = aggregate(ups, ref, method, clip=clip)
    honest_mean = np.mean([h.weight for h in honest], axis=0)
    err_plain = np.linalg.norm(plain.weight - honest_mean)
    err_robust = np.linalg.norm(robust.weight - honest_mean)
    assert err_plain > 10 * np.linalg.norm(ref.weight) * 0.5
    assert err_robust < 0.1 * np.linalg.norm(ref.weight), (method, err_robust)


def test_robust_clip_ignores_robots_that_offer_the_reference_and_caps_claimed_labels():
    """Robots whose rounds were rejected offer the fleet head itself (a zero update): the robust clip is
    set by the robots that moved, and a poisoned robot claiming many labels weighs no more than a
    typical robot."""
    rng = np.random.default_rng(4)
    ref = toy_head()
    moved = [Head(ref.weight + rng.normal(0, 0.05, ref.weight.shape).astype(np.float32), ref.bias,
                  TOY_CLASSES) for _ in range(2)]
    poisoned = Head(-10 * ref.weight, -10 * ref.bias, TOY_CLASSES)
    ups = [Update.from_head(h, {'teacher': 100}) for h in [ref, ref] + moved]
    ups.append(Update.from_head(poisoned, {'topic': 2000}))
    info = {}
    f = aggregate(ups, ref, 'mean', None, info=info)
    assert 0 < info['clip'] < 1.0 and max(info['weights']) == 100
    step = np.linalg.norm(f.weight - ref.weight)
    assert step <= info['clip'] + 1e-5  # the fleet head moved at most as far as a typical robot did
    assert accuracy(f, *toy_eval()) == pytest.approx(accuracy(ref, *toy_eval()), abs=0.05)


def toy_eval():
    imgs, y = toy_frames(np.random.default_rng(9), 200)
    return toy_features(imgs), y


def test_local_step_trains_from_the_fleet_head(tmp_path):
    from edge_tl_ros.fleet.local import local_step

    bundle = load_bundle(make_toy_bundle(tmp_path / 'toy'))
    imgs, y = toy_frames(np.random.default_rng(6), 120, shifted=True)
    feats = toy_features(imgs)
    cfg = AdaptConfig(label_sources=('topic',))
    h = local_step(bundle, (feats, y, ['topic'] * len(y)), bundle.head, cfg)
    assert h.class_names == TOY_CLASSES and accuracy(h, feats, y) > accuracy(bundle.head, feats, y)
    af, al = bundle.anchor  # anchor replay: the source domain is not forgotten
    assert accuracy(h, af, al) >= accuracy(bundle.head, af, al) - 0.2
    with pytest.raises(ValueError):
        local_step(bundle, (feats[:0], y[:0], []), bundle.head, cfg)


def test_dp_update_clips_and_adds_noise():
    rng = np.random.default_rng(3)
    ref, h = toy_head(), _head(rng, scale=5.0)
    c = dp_update(h, ref, clip=0.5, noise=0.0)
    d = np.concatenate([(c.weight - ref.weight).ravel(), (c.bias - ref.bias).ravel()])
    assert np.linalg.norm(d) == pytest.approx(0.5, rel=1e-4)
    n1 = dp_update(h, ref, 0.5, 1.0, np.random.default_rng(0))
    assert not np.allclose(n1.weight, c.weight) and n1.class_names == h.class_names
    assert dp_update(h, ref, 0.0, 1.0) is h


# -- the robot's gate + registry ----------------------------------------------------------------------------
@pytest.fixture
def toy(tmp_path):
    bundle = load_bundle(make_toy_bundle(tmp_path / 'toy'))
    rng = np.random.default_rng(5)
    imgs, y = toy_frames(rng, 120, shifted=True)
    return bundle, toy_features(imgs), y


def test_gate_refuses_a_bad_fleet_head_accepts_a_good_one_and_registry_rolls_back(toy, tmp_path):
    bundle, feats, y = toy
    cfg = AdaptConfig(label_sources=('topic',))
    data = (feats, y, ['topic'] * len(y))
    cur = bundle.head
    bad = toy_head(permute=(1, 2, 0))
    r = gate_fleet_head(bundle, data, cur, bad, cfg, margin=0.0)
    assert not r.accepted and 'fleet head' in r.reason
    # a head of the robot's own recipe (run_round: local frames + anchor replay) is a good fleet head
    good = run_round(bundle, data, cur, cfg).head
    assert accuracy(good, feats, y) > accuracy(cur, feats, y)
    r = gate_fleet_head(bundle, data, cur, good, cfg, margin=0.0)
    assert r.accepted, r.reason
    assert r.metrics['holdout_acc_new'] >= r.metrics['holdout_acc_old']
    # one that learnt the shift but forgot the source domain fails the anchor check
    forget = train_head(feats, y, cur, l2_to_prior=1e-6)
    assert accuracy(forget, feats, y) > accuracy(cur, feats, y)
    f = gate_fleet_head(bundle, data, cur, forget, cfg, margin=0.0)
    assert not f.accepted and 'anchor' in f.reason
    reg = HeadRegistry(bundle, tmp_path / 'state')
    v = reg.add(r.head, {'reason': r.reason, 'kind': 'fleet'})
    assert v.version == 1 and reg.current_version == 1
    np.testing.assert_allclose(reg.load().weight, good.weight)
    back = reg.rollback()
    assert back.version == 0 and reg.current_version == 0


# -- a real Flower server + robot clients on loopback --------------------------------------------------------
class Robot:
    """A robot's fleet side in a test: offers a head trained on its own shifted frames, gates the fleet
    head on them, logs every message its Flower client sends."""

    def __init__(self, name, bundle, seed, shifted=True):
        from edge_tl_ros.fleet.client import FleetClient, MessageLog

        rng = np.random.default_rng(seed)
        imgs, self.y = toy_frames(rng, 90, shifted=shifted)
        self.frames_shape = imgs.shape[1:]
        self.feats = toy_features(imgs)
        self.bundle = bundle
        self.head = train_head(self.feats, self.y, bundle.head, l2_to_prior=1e-2)
        self.cfg = AdaptConfig(label_sources=('topic',))
        self.log = MessageLog(keep=True)
        self.decisions = []
        self.client = FleetClient(name, self.offer, self.judge)

    def offer(self, fleet):
        return self.head, {'topic': len(self.y)}

    def judge(self, fleet, final):
        r = gate_fleet_head(self.bundle, (self.feats, self.y, ['topic'] * len(self.y)), self.head, fleet,
                            self.cfg, margin=0.0)
        if final:
            self.decisions.append(r)
        return {'accepted': r.accepted, 'holdout_acc_fleet': r.metrics.get('holdout_acc_new'),
                'n_holdout': r.metrics.get('n_holdout')}


def _run_fleet(bundle, robots, port, rounds=2, sessions=1, method='mean'):
    from edge_tl_ros.fleet.client import run_client
    from edge_tl_ros.fleet.server import FleetServer, FleetStrategy

    strategy = FleetStrategy(min_robots=len(robots), rounds=rounds, method=method, reference=bundle.head,
                             round_timeout=60)
    srv = FleetServer(f'127.0.0.1:{port}', strategy).start(sessions)
    errors = []

    def go(r):
        try:
            run_client(r.client, f'127.0.0.1:{port}', max_retries=20, max_wait_time=60, log=r.log)
        except Exception as e:  # reported below
            errors.append(e)
    ts = [threading.Thread(target=go, args=(r,)) for r in robots]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert srv.join(60) and srv.error is None and not errors, (srv.error, errors)
    return strategy


def test_flower_server_and_robot_clients_make_a_fleet_head_and_only_heads_leave_a_robot(toy):
    bundle = toy[0]
    robots = [Robot(f'robot{k}', bundle, 10 + k) for k in range(3)]
    strategy = _run_fleet(bundle, robots, _free_port(), rounds=2)
    fleet = strategy.fleet_head
    assert fleet is not None and fleet.class_names == TOY_CLASSES
    ups = [Update.from_head(r.head, {'topic': len(r.y)}) for r in robots]
    expected = bundle.head
    for _ in range(2):  # each round clips every update to the median norm around the last fleet head
        expected = aggregate(ups, expected, 'mean', None, first_classes=TOY_CLASSES)
    np.testing.assert_allclose(fleet.weight, expected.weight, rtol=1e-4, atol=1e-5)
    assert [len(e['robots']) for e in strategy.log] == [3, 3]
    for r in robots:
        assert len(r.client.fleet_heads) == 2 and len(r.decisions) == 1  # gated once, on the last round
        np.testing.assert_allclose(r.client.fleet_heads[-1].weight, fleet.weight, rtol=1e-6)

    # privacy: every message each client sent holds only the head's arrays and scalars
    C, D = len(TOY_CLASSES), TOY_FEATURES
    allowed_strings = {'\n'.join(TOY_CLASSES)}
    for r in robots:
        types = [rec['type'] for rec in r.log.records]
        assert types.count('train') == 2 and types.count('evaluate') == 2, types
        for rec in r.log.records:
            assert rec['bytes'] > 0
            for name, (kind, values) in rec['content'].items():
                if kind == 'arrays':
                    shapes = sorted(tuple(a.shape) for a in values)
                    assert shapes == sorted([(C, D), (C,)]), (name, shapes)
                    for arr in values:
                        assert arr.dtype == np.float32 and arr.size in (C * D, C)
                        assert arr.shape != r.frames_shape and arr.shape != r.feats.shape
                else:
                    assert kind in ('ConfigRecord', 'MetricRecord'), (name, kind)
                    for k, v in values.items():
                        assert isinstance(v, (bool, int, float, str)), (k, type(v))
                        if isinstance(v, str):
                            assert v in allowed_strings | {r.client.robot, '', 'Success'}, (k, v)  # status
        train_bytes = [rec['bytes'] for rec in r.log.records if rec['type'] == 'train']
        assert max(train_bytes) < 4 * (C * D + C) * 4 + 2048  # the head, not frames


def test_fleet_server_cli_and_a_robot_in_their_own_processes_server_down_is_an_error(toy, tmp_path):
    import json

    from edge_tl_ros.fleet.client import FleetClient, run_client

    bundle = toy[0]
    port = _free_port()
    # nobody listens: a bounded retry, then an exception (the node counts it and backs off)
    c = FleetClient('lonely', lambda fleet: (bundle.head, {'topic': 1}))
    with pytest.raises(Exception):
        run_client(c, f'127.0.0.1:{port}', max_retries=1, max_wait_time=2)
    out = tmp_path / 'fleet'
    server = subprocess.Popen([sys.executable, '-m', 'edge_tl_ros.cli', 'fleet-server', '--address',
                               f'127.0.0.1:{port}', '--min-robots', '2', '--sessions', '1', '--bundle',
                               str(bundle.root), '--out', str(out), '--round-timeout', '60'],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_listening(port, server)
    code = f'''
from edge_tl_ros.bundle import load_bundle
from edge_tl_ros.fleet.client import FleetClient, run_client
h = load_bundle({str(bundle.root)!r}).head
c = FleetClient('proc', lambda fleet: (h, {{'teacher': 50}}), lambda fleet, final: {{'accepted': False}})
run_client(c, '127.0.0.1:{port}', max_retries=30, max_wait_time=60)
print('fleet head classes', len(c.fleet_heads[-1].class_names))
'''
    robot = subprocess.Popen([sys.executable, '-c', code], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    local = Robot('local', bundle, 21)
    try:
        run_client(local.client, f'127.0.0.1:{port}', max_retries=30, max_wait_time=60)
        r_out, _ = robot.communicate(timeout=120)
        s_out, _ = server.communicate(timeout=60)
    finally:
        for p in (robot, server):
            if p.poll() is None:
                p.kill()
    assert robot.returncode == 0 and 'fleet head classes 3' in r_out, r_out[-2000:]
    assert server.returncode == 0, s_out[-2000:]
    log = [json.loads(line) for line in (out / 'fleet_log.jsonl').read_text().splitlines()]
    assert sorted(log[0]['rounds'][0]['robots']) == ['local', 'proc']
    agg = log[0]['rounds'][0]['aggregation']
    assert sorted(agg['trusted']) == sorted([50, len(local.y)])
    assert max(agg['weights']) == np.median([50, len(local.y)])  # robust: capped at the median weight
    fleet = Head.load(out / 'fleet_head_s1.npz')
    assert fleet.class_names == TOY_CLASSES
    np.testing.assert_allclose(local.client.fleet_heads[-1].weight, fleet.weight, rtol=1e-6)
    assert len(local.decisions) == 1


# -- the adaptation node's fleet worker (real rclpy, real Flower) -------------------------------------------
def test_adaptation_node_joins_the_fleet_gates_and_registers_the_fleet_head(ros_context, tmp_path):
    pytest.importorskip('rclpy')
    pytest.importorskip('vision_msgs.msg')
    import time

    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter

    from edge_tl_ros.engine import Engine
    from edge_tl_ros.fleet.client import run_client
    from edge_tl_ros.fleet.server import FleetServer, FleetStrategy
    from edge_tl_ros.nodes.adaptation_node import AdaptationNode
    from edge_tl_ros.store import FrameStore

    root = make_toy_bundle(tmp_path / 'toy')
    bundle = load_bundle(root)
    state = tmp_path / 'state'
    # the robot's store: labelled frames of its shifted domain (what the node collected)
    rng = np.random.default_rng(7)
    imgs, y = toy_frames(rng, 90, shifted=True)
    eng = Engine(bundle, 'feature_extractor', num_threads=1)
    store = FrameStore(state / 'store', max_entries=1000, crop_size=(64, 64),
                       feature_size=bundle.feature_size)
    feats, probs = eng.features_batch(imgs), eng.predict_batch(imgs)
    for i in range(len(imgs)):
        store.add(1_000_000 + i, imgs[i], feats[i], probs[i], label=TOY_CLASSES[y[i]], source='topic')
    del store
    port = _free_port()
    params = {'model_bundle': str(root), 'state_dir': str(state), 'teacher_bundle': '',
              'store.sample_rate_hz': 0.0, 'accept.anchor_tolerance': 0.1, 'fleet.enabled': True,
              'fleet.server_address': f'127.0.0.1:{port}', 'fleet.robot_name': 'node_robot',
              'fleet.retry_min_s': 0.2, 'fleet.retry_max_s': 0.5, 'fleet.session_timeout_s': 60.0,
              'fleet.local_training': True}  # its offer: the round's recipe from the fleet head
    node = AdaptationNode(context=ros_context,
                          parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
    ex = MultiThreadedExecutor(num_threads=2, context=ros_context)
    ex.add_node(node)
    t = threading.Thread(target=ex.spin, daemon=True)
    t.start()
    try:
        node.fleet.trigger('test')  # nobody listens yet: counted, retried with backoff, node fine
        deadline = time.monotonic() + 30
        while node.fleet.failures < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert node.fleet.failures >= 1 and node.fleet.last_error
        assert node.status()['fleet']['failures'] >= 1
        # the server comes up with one more robot whose head learnt the same shift (its own round)
        cfg = AdaptConfig(label_sources=('topic',), anchor_tolerance=0.1)
        o_imgs, o_y = toy_frames(np.random.default_rng(8), 90, shifted=True)
        o_feats = toy_features(o_imgs)
        other_head = run_round(bundle, (o_feats, o_y, ['topic'] * len(o_y)), bundle.head, cfg).head
        from edge_tl_ros.fleet.client import FleetClient
        other = FleetClient('other', lambda fleet: (other_head, {'topic': len(o_y)}),
                            lambda fleet, final: {'accepted': False})
        strategy = FleetStrategy(min_robots=2, rounds=1, reference=bundle.head, round_timeout=60)
        srv = FleetServer(f'127.0.0.1:{port}', strategy).start(1)
        run_client(other, f'127.0.0.1:{port}', max_retries=20, max_wait_time=60)
        assert srv.join(60) and srv.error is None
        deadline = time.monotonic() + 30
        while node.fleet.sessions < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        st = node.status()['fleet']
        assert st['sessions'] == 1 and st['accepted'] + st['rejected'] == 1, st
        assert sorted(strategy.log[0]['robots']) == ['node_robot', 'other']
        assert st['bytes_sent'] > 0
        # two heads of the same shift: the fleet head beats v0 on the node's holdout -> a new version
        assert st['accepted'] == 1, st
        reg = HeadRegistry(bundle, state)
        assert reg.current_version == 1 and node._followed == 1
        meta = reg.index()['versions']['1']['metrics']
        assert meta['kind'] == 'fleet' and meta['holdout_acc_new'] >= meta['holdout_acc_old']
        assert st['last_error'] is None  # cleared by the successful session
        node._publish_diagnostics()  # fleet_* key/values; must not raise
        assert reg.rollback().version == 0
    finally:
        ex.shutdown()
        node.destroy_node()


def test_robot_runtime_and_cli_need_no_flower_unless_the_fleet_is_used(python_without):
    out = python_without(('flwr', 'torch'), (
        'import edge_tl_ros.nodes.adaptation_node as a, edge_tl_ros.fleet.update, edge_tl_ros.fleet.gate\n'
        'from edge_tl_ros.cli import build_parser\n'
        'build_parser().parse_args(["fleet-server", "--min-robots", "3"])\n'
        'print("fleet.enabled" in a.PARAMETERS, a.PARAMETERS["fleet.enabled"][0])\n'))
    assert out.split() == ['True', 'False']


def _tls_files(d: Path) -> Path:
    """A private CA and a server certificate for 127.0.0.1 (what docs/fleet.md makes with openssl)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'edge-tl fleet test CA')])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'localhost')]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName('localhost'),
                                                        x509.IPAddress(ipaddress.ip_address('127.0.0.1'))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    d.mkdir(parents=True, exist_ok=True)
    (d / 'ca.crt').write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / 'server.pem').write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / 'server.key').write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                     serialization.PrivateFormat.TraditionalOpenSSL,
                                                     serialization.NoEncryption()))
    return d


def test_tls_session_and_local_dp_on_the_update(toy, tmp_path):
    """Flower's TLS option end to end (server --tls-dir files, robots' root certificate), with local DP:
    what a robot sends is its head moved at most dp_clip from the fleet head, plus noise."""
    from edge_tl_ros.fleet.client import FleetClient, MessageLog, run_client
    from edge_tl_ros.fleet.server import FleetServer, FleetStrategy, load_certificates

    bundle = toy[0]
    tls = _tls_files(tmp_path / 'tls')
    port = _free_port()
    strategy = FleetStrategy(min_robots=2, rounds=1, reference=bundle.head, clip=0, round_timeout=60)
    srv = FleetServer(f'127.0.0.1:{port}', strategy, certificates=load_certificates(str(tls))).start(1)
    robots = [Robot(f'r{k}', bundle, 30 + k) for k in range(2)]
    clip = 0.5
    for r in robots:
        r.client = FleetClient(r.client.robot, r.offer, r.judge, dp_clip=clip, dp_noise=0.0)
    # a robot without the CA cannot join: an error, not a hang
    stranger = FleetClient('stranger', lambda fleet: (bundle.head, {'topic': 1}))
    with pytest.raises(Exception):
        run_client(stranger, f'127.0.0.1:{port}', max_retries=0, max_wait_time=5)
    cert = (tls / 'ca.crt').read_bytes()
    errors = []

    def go(r):
        try:
            r.log = MessageLog(keep=True)
            run_client(r.client, f'127.0.0.1:{port}', root_certificates=cert, max_retries=5,
                       max_wait_time=60, log=r.log)
        except Exception as e:  # reported below
            errors.append(e)
    ts = [threading.Thread(target=go, args=(r,)) for r in robots]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert srv.join(60) and srv.error is None and not errors, (srv.error, errors)
    ref = bundle.head
    for r in robots:
        sent = next(rec for rec in r.log.records if rec['type'] == 'train')
        W, b = next(v for kind, v in sent['content'].values() if kind == 'arrays')
        if W.ndim == 1:
            W, b = b, W
        moved = np.linalg.norm(np.concatenate([(W - ref.weight).ravel(), (b - ref.bias).ravel()]))
        assert moved <= clip + 1e-4
        full = np.linalg.norm(np.concatenate([(r.head.weight - ref.weight).ravel(),
                                              (r.head.bias - ref.bias).ravel()]))
        assert full > clip  # the clip did something
    assert strategy.fleet_head is not None


def test_fleet_demo_runs_a_server_and_robot_processes(tmp_path):
    """`edge-tl fleet-demo`: the server and two robot processes (night, fog) on loopback, real data."""
    import json

    from edge_tl_ros.data import DataError, find_gtsrb_npz

    try:
        find_gtsrb_npz(None)
    except (DataError, OSError) as e:
        pytest.skip(f'GTSRB data absent: {e}')
    out = tmp_path / 'demo'
    p = subprocess.run([sys.executable, '-m', 'edge_tl_ros.cli', 'fleet-demo', '--shifts', 'night,fog',
                        '--frames', '120', '--test', '100', '--out', str(out), '--timeout', '300'],
                       cwd=REPO, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    summary = json.loads((out / 'fleet_demo.json').read_text())
    assert [r['robot'] for r in summary['robots']] == ['night', 'fog']
    log = json.loads((out / 'server' / 'fleet_log.jsonl').read_text().splitlines()[0])
    assert sorted(log['rounds'][0]['robots']) == ['robot_fog', 'robot_night']
    for r in summary['robots']:
        assert set(r['local']) == set(r['fleet']) == {'night', 'fog'} and r['gate'] is not None
        # the registry holds v0, the local round's head if accepted, the fleet head if its gate accepted
        assert r['registry_version'] == int(r['local_round']['accepted']) + int(r['gate']['accepted'])
