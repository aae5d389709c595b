"""Processes dying and coming back, with real processes, real DDS and real files.

1. A writer of heads + labelled store entries SIGKILLed at random moments, again and again: every
   accepted head and every stored label survives, nothing is torn (HeadRegistry / FrameStore only).
2. One graph of separate processes -- perception node, adaptation node, a camera at 30 Hz -- and this
   test process (labels, service calls, observer):
   - a label topic flood at 1 kHz: perception keeps its output rate on its head, the adaptation node's
     memory and pending-label map stay bounded and the overflow is counted;
   - the perception node SIGKILLed; an accepted round meanwhile: the adaptation node's reload call fails
     gracefully (says so in ~/status, keeps running); the restarted perception node comes up on the last
     accepted head;
   - the camera process disappears and a new one comes back: perception resumes;
   - the adaptation node SIGKILLed while it writes labelled frames: after a restart nothing is torn and
     every stored label is the one that was sent;
   - perception keeps up throughout: every diagnostics period with input has output (and no gap > 1 s
     in what this process receives during the flood).
(SIGKILL of the adaptation node mid-round is in test_adaptation_node.py; not repeated.)
"""

import collections
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_tl_ros.bundle import HeadRegistry, load_bundle
from edge_tl_ros.store import FrameStore
from edge_tl_ros.toy import TOY_CLASSES, make_toy_bundle, toy_frames

REPO = Path(__file__).resolve().parents[1]
CLASSES = ('red', 'green', 'blue')

KILL_WRITER = textwrap.dedent('''
    import sys
    import numpy as np
    from edge_tl_ros.bundle import Head, HeadRegistry, load_bundle
    from edge_tl_ros.store import FrameStore
    toy, state, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
    reg = HeadRegistry(load_bundle(toy, check_onnx=False), state)
    st = FrameStore(state + '/store', max_entries=10**6, max_bytes=1 << 40, crop_size=(48, 48))
    names = ['red', 'green', 'blue'] + [f'n{i}' for i in range(3000)]  # ~100 KB heads: slow writes
    rng = np.random.default_rng(start)
    print('ready', flush=True)
    for i in range(start, start + 10**6):
        if i % 3 == 0:
            w = np.full((len(names), 8), float(i), np.float32)
            reg.add(Head(w, np.zeros(len(names), np.float32), names))
        st.add(i, rng.integers(0, 256, (48, 48, 3), dtype=np.uint8), np.full(8, i, np.float32),
               np.full(3, 1 / 3, np.float32))
        st.set_label(i, ('red', 'green', 'blue')[i % 3], 'topic')
''')


def test_writer_sigkilled_at_random_points_loses_nothing(tmp_path):
    toy = make_toy_bundle(tmp_path / 'toy')
    state = tmp_path / 'state'
    env = dict(os.environ, PYTHONPATH=str(REPO))
    rng = np.random.default_rng(0)
    start = 0
    for kills in range(1, 7):
        p = subprocess.Popen([sys.executable, '-c', KILL_WRITER, str(toy), str(state), str(start)], env=env,
                             cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == 'ready'
        time.sleep(float(rng.uniform(0.2, 0.8)))
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        p.stdout.close()
        # heads: every accepted version loads (sha256 checked) and encodes the step that wrote it
        reg = HeadRegistry(load_bundle(toy), state)
        idx = reg.index()
        assert idx['current'] == idx['accepted'][-1]
        for v in idx['accepted'][1:]:
            h = reg.load(v)
            assert h.weight[0, 0] % 3 == 0
        assert reg.load_current_or_fallback()[1] is None
        # store: nothing torn; every label present is the one written for that stamp
        st = FrameStore(state / 'store', max_entries=10**6, max_bytes=1 << 40)
        assert st.corrupt_removed == 0
        arr = st.entries()
        for s, lab, f in zip(arr.stamps.tolist(), arr.labels, arr.features):
            assert f[0] == s and lab in (None, CLASSES[s % 3])
        # unlabelled: at most the entry being labelled at each kill
        assert sum(lab is None for lab in arr.labels) <= kills
        start = int(arr.stamps.max()) + 1 if len(arr) else start
    assert len(HeadRegistry(load_bundle(toy), state).index()['accepted']) > 3 and start > 10


# -- the process graph ------------------------------------------------------------------------------------
rclpy = pytest.importorskip('rclpy')
psutil = pytest.importorskip('psutil')
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import String  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402
from vision_msgs.msg import Classification, ObjectHypothesis  # noqa: E402

from edge_tl_ros.imaging import image_fields  # noqa: E402

CAMERA = textwrap.dedent('''
    import signal, sys, time
    import numpy as np
    import rclpy
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image
    from edge_tl_ros.imaging import image_fields
    rclpy.init()
    node = rclpy.create_node('camera')
    pub = node.create_publisher(Image, 'image', qos_profile_sensor_data)
    msgs = []
    for rgb in ((220, 30, 30), (30, 220, 30), (30, 30, 220)):
        img = np.zeros((16, 16, 3), np.uint8); img[:] = rgb
        msgs.append(Image(**image_fields(img, 'rgb8')))
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    period, t_next, seq = 1 / float(sys.argv[1]), time.monotonic(), 0
    while not stop:
        m = msgs[seq % 3]
        t = time.time()
        m.header.stamp.sec, m.header.stamp.nanosec = int(t), int((t % 1) * 1e9)
        m.header.frame_id = f'cam{seq % 3}'
        pub.publish(m)
        seq += 1
        t_next += period
        time.sleep(max(0.0, t_next - time.monotonic()))
    node.destroy_node()
    rclpy.try_shutdown()
''')

ADAPT_PARAMS = {'accept.anchor_tolerance': 0.1, 'round.min_labelled': 30, 'round.every_n_labels': 0,
                'store.sample_rate_hz': 0.0, 'advanced.nice_level': 5}


def wait_for(cond, timeout, step=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(step)
    return cond()


class Graph:
    """The processes and this test's observer node."""

    def __init__(self, ctx, domain, tmp_path):
        self.tmp = tmp_path
        self.toy = make_toy_bundle(tmp_path / 'toy')
        self.state = tmp_path / 'state'
        self.env = dict(os.environ, ROS_DOMAIN_ID=str(domain), PYTHONPATH=str(REPO), PYTHONUNBUFFERED='1')
        self.procs = {}
        self.node = rclpy.create_node('observer', context=ctx)
        rel = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        self.pub_img = self.node.create_publisher(Image, 'image', rel)
        self.pub_lab = self.node.create_publisher(Classification, 'labels', rel)
        self.cls = []  # (receipt monotonic time, frame_id, class)
        self.node.create_subscription(Classification, '/perception/classification', self._on_cls, 100)
        self.diag = {}  # node -> latest {key: value}
        self.diag_hist = []  # (time, node, values) of every status
        self.diag_count = collections.Counter()  # node -> diagnostics messages received
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diag, 50)
        self.status = []
        latched = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.node.create_subscription(String, '/adaptation/status',
                                      lambda m: self.status.append(json.loads(m.data)), latched)
        self.adapt_now = self.node.create_client(Trigger, '/adaptation/adapt_now')
        self.ex = MultiThreadedExecutor(num_threads=3, context=ctx)
        self.ex.add_node(self.node)
        threading.Thread(target=self.ex.spin, daemon=True).start()
        self.stamp = 0

    def _on_cls(self, msg):
        self.cls.append((time.monotonic(), msg.header.frame_id, msg.results[0].class_id))

    def _on_diag(self, msg):
        for st in msg.status:
            self.diag[st.name.split(':')[0]] = {kv.key: kv.value for kv in st.values}
            name = st.name.split(':')[0]
            self.diag_hist.append((time.monotonic(), name, self.diag[name]))
            self.diag_count[st.name.split(':')[0]] += 1

    def start(self, name, argv):
        log = open(self.tmp / f'{name}.log', 'a')
        self.procs[name] = (subprocess.Popen([sys.executable, *argv], env=self.env, cwd=REPO, stdout=log,
                                             stderr=subprocess.STDOUT), log)
        return self.procs[name][0]

    def start_perception(self):
        return self.start('perception', ['-m', 'edge_tl_ros.nodes.perception_node', '--ros-args',
                                         '-p', f'model_bundle:={self.toy}', '-p', f'state_dir:={self.state}'])

    def start_adaptation(self):
        args = ['-p', f'model_bundle:={self.toy}', '-p', f'state_dir:={self.state}']
        for k, v in ADAPT_PARAMS.items():
            args += ['-p', f'{k}:={v}']
        return self.start('adaptation', ['-m', 'edge_tl_ros.nodes.adaptation_node', '--ros-args', *args])

    def start_camera(self, rate=30):
        return self.start('camera', ['-c', CAMERA, str(rate)])

    def kill(self, name, sig=signal.SIGKILL):
        p, log = self.procs.pop(name)
        p.send_signal(sig)
        p.wait(15)
        log.close()

    def log(self, name):
        return (self.tmp / f'{name}.log').read_text(errors='replace')[-3000:]

    def last_status(self):
        return self.status[-1] if self.status else {}

    def rate(self, t0, t1, prefix='cam'):
        return sum(1 for t, f, _ in self.cls if t0 <= t < t1 and f.startswith(prefix)) / (t1 - t0)

    def max_gap(self, t0, t1):
        ts = [t0] + [t for t, f, _ in self.cls if t0 <= t < t1] + [t1]
        return max(np.diff(ts))

    def call(self, client, timeout=15):
        assert client.wait_for_service(timeout_sec=timeout), client.srv_name
        fut = client.call_async(Trigger.Request())
        assert wait_for(fut.done, timeout), client.srv_name
        return fut.result()

    def send_labelled(self, images, labels, period=0.005):
        sent = {}
        for img, y in zip(images, labels):
            self.stamp += 1
            msg = Image(**image_fields(img, 'rgb8'))
            sec, nsec = 100 + self.stamp // 1000, (self.stamp % 1000) * 1000
            msg.header.stamp.sec, msg.header.stamp.nanosec = sec, nsec
            msg.header.frame_id = 'labelled'
            self.pub_img.publish(msg)
            hyp = ObjectHypothesis(class_id=TOY_CLASSES[y], score=1.0)
            self.pub_lab.publish(Classification(header=msg.header, results=[hyp]))
            sent[sec * 10**9 + nsec] = TOY_CLASSES[y]
            time.sleep(period)
        return sent

    def close(self):
        for name in list(self.procs):
            p, _ = self.procs[name]
            if p.poll() is None:
                self.kill(name, signal.SIGINT if name != 'camera' else signal.SIGTERM)
        self.ex.shutdown(timeout_sec=2)
        self.node.destroy_node()


def test_process_graph_survives_kills_restarts_and_floods(ros_context, ros_domain, tmp_path):
    g = Graph(ros_context, ros_domain, tmp_path)
    try:
        perc = g.start_perception()
        adapt = g.start_adaptation()
        g.start_camera(30)
        assert wait_for(lambda: g.rate(time.monotonic() - 1, time.monotonic()) > 15, 60), g.log('perception')
        assert wait_for(lambda: g.last_status().get('pid') == adapt.pid, 60), g.log('adaptation')
        assert wait_for(lambda: g.pub_lab.get_subscription_count() >= 1
                        and g.pub_img.get_subscription_count() >= 2, 10)
        t = time.monotonic()
        time.sleep(2.0)
        base_rate = g.rate(t, time.monotonic())
        assert base_rate > 20, base_rate

        # 1) a label flood at 1 kHz (stamps of frames nobody will ever see: the pending map's worst case)
        rss0 = psutil.Process(adapt.pid).memory_info().rss
        t_flood = time.monotonic()
        n_flood = 0
        lab = Classification(results=[ObjectHypothesis(class_id='red', score=1.0)])
        next_t = time.perf_counter()
        while time.monotonic() - t_flood < 3.0:
            n_flood += 1
            lab.header.stamp.sec, lab.header.stamp.nanosec = 900_000 + n_flood, 0
            g.pub_lab.publish(lab)
            next_t += 1e-3
            time.sleep(max(0.0, next_t - time.perf_counter()))
        t_flood_end = time.monotonic()
        flood_rate = g.rate(t_flood + 0.5, t_flood_end)
        assert n_flood >= 2500
        assert flood_rate > 0.7 * base_rate, (flood_rate, base_rate)
        assert g.max_gap(t_flood, t_flood_end) < 1.0
        assert g.diag['/perception']['head_version'] == '0'

        # the node takes what DDS delivers (a Python executor takes a few hundred callbacks per second on
        # this machine; KEEP_LAST queues overwrite the rest before delivery); all of it is accounted for
        def settled():  # two fresh ~/status messages with the same count
            n, c1 = len(g.status), g.last_status().get('counters', {}).get('labels_received', 0)
            if not wait_for(lambda: len(g.status) >= n + 2, 5):
                return None
            s = g.last_status()
            return s if s.get('counters', {}).get('labels_received', 0) == c1 and c1 > 0 else None
        s = wait_for(settled, 20)
        assert s, g.last_status().get('counters')
        c = s['counters']
        # how many reach the node depends on the machine's load (300-900 here; 225 on a busy CI run): the
        # flood must exceed what the frames alone could explain (30 Hz x 3 s); the accounting is exact
        assert c['labels_received'] > 100, c
        assert c['labels_received'] == c['labels_handled'] + c.get('labels_bad', 0) + s['labels_dropped']
        assert s['pending_labels'] <= 512
        # none stored (no frame): each handled label is pending or expired ('labels_expired' absent while 0)
        assert c.get('labels_expired', 0) + s['pending_labels'] >= c['labels_handled'] - 1
        print(f"label flood: published {n_flood} in 3 s, adaptation received {c['labels_received']}, "
              f"pending {s['pending_labels']}, perception {flood_rate:.1f} Hz (before {base_rate:.1f} Hz)")
        rss_growth = (psutil.Process(adapt.pid).memory_info().rss - rss0) / 2**20
        assert rss_growth < 30, rss_growth

        # 2) labelled shifted frames for a round, then perception dies; the accepted round's reload fails
        rng = np.random.default_rng(1)
        imgs, y = toy_frames(rng, 80, shifted=True)
        g.send_labelled(imgs, y, period=0.02)
        assert wait_for(lambda: g.last_status().get('label_counts', {}).get('topic', 0) >= 70, 20), \
            (g.last_status().get('counters'), g.last_status().get('label_counts'))
        g.kill('perception')
        t_dead = time.monotonic()
        assert g.call(g.adapt_now).success
        s = wait_for(lambda: (g.last_status().get('reload') or {}).get('done') and g.last_status(), 60)
        assert s, g.last_status()
        assert s['round']['last']['accepted'] and s['head_version'] == 1 and s['registry_version'] == 1
        assert s['reload']['success'] is False and s['pid'] == adapt.pid and adapt.poll() is None
        assert 'loads v1' in s['reload']['message'], s['reload']  # not answered / not available: said so
        assert HeadRegistry(load_bundle(g.toy), g.state).current_version == 1
        # the restarted perception node comes up on the last accepted head and classifies again
        perc = g.start_perception()
        assert wait_for(lambda: g.diag.get('/perception', {}).get('head_version') == '1'
                        and g.rate(time.monotonic() - 2, time.monotonic()) > 5, 60), \
            (g.diag.get('/perception'), g.rate(time.monotonic() - 2, time.monotonic()), g.log('perception'))
        assert 'head v1' in g.log('perception')
        assert time.monotonic() - t_dead > 1

        # 3) the camera goes away (perception keeps its diagnostics) and a new one comes back
        g.kill('camera', signal.SIGKILL)
        time.sleep(1.5)
        t_gone = time.monotonic()
        diag_before = g.diag_count['/perception']
        time.sleep(1.5)
        assert g.rate(t_gone, time.monotonic()) == 0
        assert g.diag_count['/perception'] > diag_before and perc.poll() is None  # diagnostics go on
        g.start_camera(30)
        assert wait_for(lambda: g.rate(time.monotonic() - 1, time.monotonic()) > 15, 60), g.log('camera')
        t_back = time.monotonic()

        # 4) the adaptation node is SIGKILLed while it writes labelled frames; restart: nothing torn
        more, more_y = toy_frames(rng, 300, shifted=True)
        sent = {}
        writer = threading.Thread(target=lambda: sent.update(g.send_labelled(more, more_y, period=0.004)))
        writer.start()
        time.sleep(0.6)
        g.kill('adaptation')
        writer.join()
        st = FrameStore(g.state / 'store', max_entries=10**6, max_bytes=1 << 40)
        assert st.corrupt_removed == 0
        lab = st.labelled()
        got = dict(zip(lab.stamps.tolist(), lab.labels))
        new = {s: name for s, name in got.items() if s in sent}
        assert new and all(sent[s] == name for s, name in new.items()), 'a stored label is wrong'
        n_entries = len(st)
        adapt = g.start_adaptation()
        assert wait_for(lambda: g.last_status().get('pid') == adapt.pid, 60), g.log('adaptation')
        s = g.last_status()
        assert s['head_version'] == 1 and s['store']['entries'] == n_entries
        assert s['store']['corrupt_removed'] == 0

        # perception kept up with its input throughout while it and the camera were up, on v1 since its
        # restart: every /diagnostics period with input had output. Not the gap between classifications
        # seen here: SIGKILLing a Fast DDS participant stalls this test process's own DDS traffic for
        # seconds (the writer above, ~1.5 s of frames, then takes ~25 s), while the node's own counters
        # show it receiving and publishing 30-50 frames every second (printed below)
        t_end = time.monotonic()
        periods = [kv for t, name, kv in g.diag_hist if name == '/perception' and t_back <= t <= t_end]
        assert len(periods) >= 3, periods
        stalled = [kv for kv in periods
                   if float(kv['fps_in']) > 5 and float(kv['fps_out']) < 0.5 * float(kv['fps_in'])]
        assert not stalled, stalled
        gap = g.max_gap(t_back, t_end)
        print(f'process graph: largest gap between classifications received here {gap:.2f} s while the '
              'adaptation node was killed and restarted; perception fps in/out per period: '
              f'{[(kv["fps_in"], kv["fps_out"]) for kv in periods]}')
        # the adaptation node floods, dies and restarts (imports) on the same 2 cores: the rate dips with the
        # machine's load; a stalled or blocked node would fail the per-period check above
        assert g.rate(t_back, t_end) > 0.3 * base_rate
        assert g.diag['/perception']['head_version'] == '1' and perc.poll() is None
    finally:
        g.close()
