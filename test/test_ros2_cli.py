"""The package as ROS 2 users run it: `ros2 launch`, `ros2 run`, `ros2 node/topic/param/service`.

Everything here is the real ros2 command line (launch, launch_ros, ros2cli from upstream sources,
installed into the venv by `make setup`) talking to the real nodes over Fast DDS; a bag is replayed
into the launched graph. Skipped where the venv has no `ros2` (setup found no launch sources; on a
robot ros2 comes with ROS).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ROS2 = Path(sys.prefix) / 'bin' / 'ros2'

pytestmark = pytest.mark.skipif(
    not ROS2.exists(),
    reason=f'no ros2 CLI at {ROS2}: make setup installs launch/ros2cli from ../shared/vendor/ros2_launch '
           '(or $EDGE_TL_ROS2_LAUNCH_SRC) when present; on a robot it comes with ROS')


def _env(domain: int) -> dict:
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain), ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST',
               PYTHONUNBUFFERED='1', RCUTILS_COLORIZED_OUTPUT='0')
    env.pop('FASTDDS_DEFAULT_PROFILES_FILE', None)
    return env


def _default_sigint():
    # a background job of a non-interactive shell starts with SIGINT ignored, and children inherit that
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(args, domain, **kw):
    return subprocess.Popen([str(ROS2), *args], env=_env(domain), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=_default_sigint, **kw)


def _ros2(args, domain, timeout=60) -> str:
    r = subprocess.run([str(ROS2), *args], env=_env(domain), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f'ros2 {" ".join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}'
    return r.stdout


def _wait_for(pred, what, proc, timeout=60.0, every=0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f'exit {proc.returncode} while waiting for {what}:\n{proc.stdout.read()}'
        ok, last = pred()
        if ok:
            return last
        time.sleep(every)
    raise AssertionError(f'timed out waiting for {what}; last: {last}')


def _nodes(domain):
    out = _ros2(['node', 'list', '--no-daemon', '--spin-time', '1'], domain)
    return set(out.split())


def _ros2_until(args, domain, proc, ok=lambda out: True, timeout=30) -> str:
    """A CLI call that needs discovery (a fresh process each time): retried until it succeeds and ``ok``."""
    def call():
        r = subprocess.run([str(ROS2), *args], env=_env(domain), capture_output=True, text=True, timeout=60)
        out = (r.stdout + r.stderr).strip()
        return r.returncode == 0 and ok(out), out
    return _wait_for(call, f'ros2 {" ".join(args)}', proc, timeout=timeout)


def _param(node, name, domain, proc) -> str:
    return _ros2_until(['param', 'get', node, name, '--no-daemon'], domain, proc)


def _topics(domain):
    return set(_ros2(['topic', 'list', '--no-daemon', '--spin-time', '1'], domain).split())


def _stop(proc, children, timeout=30):
    """SIGINT as ctrl-c would send it; the process and every node it started must be gone."""
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        for c in children:
            c.kill()
        out, _ = proc.communicate()
        raise AssertionError(f'no exit {timeout} s after SIGINT:\n{out[-3000:]}')
    gone, alive = psutil.wait_procs(children, timeout=10)
    for c in alive:
        c.kill()
    assert not alive, f'orphaned after SIGINT: {alive}\n{out[-3000:]}'
    return proc.returncode, out


def _params_file(tmp_path) -> Path:
    """The shipped YAML with two values changed, as a user would pass params_file:=..."""
    data = yaml.safe_load((ROOT / 'config' / 'edge_tl.yaml').read_text())
    data['/**/perception']['ros__parameters']['top_k'] = 3
    data['/**/adaptation']['ros__parameters']['store']['sample_rate_hz'] = 30.0
    path = tmp_path / 'my_params.yaml'
    path.write_text(yaml.safe_dump(data))
    return path


def test_ros2_launch_with_arguments_serves_services_and_a_replayed_bag(ros_context, ros_domain, tmp_path):
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from std_msgs.msg import String
    from vision_msgs.msg import Classification

    from edge_tl_ros.bags.io import write_bag

    frames = np.random.default_rng(0).integers(0, 256, (60, 32, 32, 3), dtype=np.uint8)
    bag = write_bag(tmp_path / 'drive', frames, labels=['Stop'] * len(frames), fps=20.0,
                    image_topic='/front/image_raw', label_topic='/robot1/labels', start_stamp=7 * 10**9)
    launch = _start(['launch', 'edge_tl_ros', 'edge_tl.launch.py', 'namespace:=robot1',
                     'camera_topic:=/front/image_raw', f'params_file:={_params_file(tmp_path)}',
                     f'state_dir:={tmp_path / "state"}', 'use_adaptation:=true'], ros_domain)
    node = rclpy.create_node('probe', context=ros_context)
    ex = SingleThreadedExecutor(context=ros_context)
    ex.add_node(node)
    got, status = [], []
    node.create_subscription(Classification, '/robot1/perception/classification', got.append, 100)
    node.create_subscription(String, '/robot1/adaptation/status', lambda m: status.append(json.loads(m.data)),
                             QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                                        reliability=ReliabilityPolicy.RELIABLE))
    children = []
    try:
        _wait_for(lambda: (lambda n: ({'/robot1/perception', '/robot1/adaptation'} <= n, n))(
            _nodes(ros_domain)), 'both nodes in `ros2 node list`', launch)
        children = psutil.Process(launch.pid).children(recursive=True)
        assert len([c for c in children if 'node' in ' '.join(c.cmdline())]) == 2, children
        # the camera remap reached both nodes; their outputs live in the namespace (nodes are listed as
        # soon as they exist, their topics once constructed: poll)
        want = {'/front/image_raw', '/robot1/perception/classification', '/robot1/adaptation/status',
                '/diagnostics'}
        _wait_for(lambda: (want <= (t := _topics(ros_domain)), t), f'topics {want}', launch)
        info = _ros2_until(['node', 'info', '/robot1/perception', '--no-daemon'], ros_domain, launch,
                           ok=lambda out: '/front/image_raw' in out)
        assert '/front/image_raw: sensor_msgs/msg/Image' in info, info
        # params_file:= values, read back through the parameter services
        assert _param('/robot1/perception', 'top_k', ros_domain, launch) == 'Integer value is: 3'
        rate = _param('/robot1/adaptation', 'store.sample_rate_hz', ros_domain, launch)
        assert rate == 'Double value is: 30.0'
        out = _ros2(['service', 'call', '/robot1/perception/reload_head', 'std_srvs/srv/Trigger'], ros_domain)
        assert 'success=True' in out and 'head v0' in out, out
        out = _ros2(['service', 'call', '/robot1/perception/rollback', 'std_srvs/srv/Trigger'], ros_domain)
        assert 'response:' in out and 'success=False' in out, out  # v0 has nothing to roll back to
        # replay the bag into the launched graph (best-effort camera QoS, as a driver publishes)
        replay = subprocess.run([sys.executable, '-m', 'edge_tl_ros.cli', 'replay', str(bag), '--image-qos',
                                 'best_effort', '--wait-for-subscribers', '20'], env=_env(ros_domain),
                                capture_output=True, text=True, timeout=120)
        assert replay.returncode == 0, replay.stdout + replay.stderr
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (len(got) < 30 or not status
                                               or status[-1]['store']['entries'] < 10):
            ex.spin_once(timeout_sec=0.2)
        assert len(got) >= 30, f'{len(got)} of {len(frames)} replayed frames classified'
        stamps = {m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for m in got}
        assert stamps <= {7 * 10**9 + i * 50_000_000 for i in range(len(frames))}  # the bag's own stamps
        assert all(len(m.results) <= 3 for m in got)  # top_k from params_file
        assert status and status[-1]['store']['entries'] >= 10, status[-1:] or 'no status'
        assert status[-1]['label_counts']['topic'] >= 10  # labels from the bag on the namespaced topic
        out = _ros2(['service', 'call', '/robot1/adaptation/adapt_now', 'std_srvs/srv/Trigger'], ros_domain)
        assert 'response:' in out and 'success=' in out, out
    finally:
        node.destroy_node()
        subprocess.run([str(ROS2), 'daemon', 'stop'], env=_env(ros_domain), capture_output=True, timeout=30)
        rc, out = _stop(launch, children)
    assert rc == 0, out[-3000:]
    assert 'process has finished cleanly' in out and 'sending signal \'SIGINT\'' in out, out[-3000:]
    assert 'Traceback' not in out, out[-5000:]


def test_ros2_launch_without_adaptation_and_ros2_run(ros_domain, tmp_path):
    launch = _start(['launch', 'edge_tl_ros', 'edge_tl.launch.py', 'use_adaptation:=false',
                     f'state_dir:={tmp_path / "s1"}'], ros_domain)
    children = []
    try:
        _wait_for(lambda: ('/perception' in (n := _nodes(ros_domain)), n), 'perception in node list', launch)
        children = psutil.Process(launch.pid).children(recursive=True)
        time.sleep(2)
        assert '/adaptation' not in _nodes(ros_domain)
        _wait_for(lambda: ('/camera/image' in (t := _topics(ros_domain)), t), '/camera/image', launch)
    finally:
        rc, out = _stop(launch, children)
    assert rc == 0, out[-3000:]
    # ros2 run: the executable found under <prefix>/lib/edge_tl_ros, --ros-args reach the node. ros2 run
    # does not forward SIGINT, so it gets a process group of its own and the group gets the signal.
    run = _start(['run', 'edge_tl_ros', 'perception_node', '--ros-args', '-r', '__ns:=/cam2', '-r',
                  'image:=/cam2/image_raw', '-p', f'state_dir:={tmp_path / "s2"}', '-p', 'top_k:=1'],
                 ros_domain, start_new_session=True)
    try:
        _wait_for(lambda: ('/cam2/perception' in (n := _nodes(ros_domain)), n), '/cam2/perception', run)
        assert _param('/cam2/perception', 'top_k', ros_domain, run) == 'Integer value is: 1'
        _wait_for(lambda: ('/cam2/image_raw' in (t := _topics(ros_domain)), t), '/cam2/image_raw', run)
        group = [run.pid] + [c.pid for c in psutil.Process(run.pid).children(recursive=True)]
    finally:
        os.killpg(run.pid, signal.SIGINT)
        try:
            out, _ = run.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            out, _ = run.communicate()
            raise AssertionError(f'ros2 run did not exit on SIGINT:\n{out[-3000:]}')
    assert run.returncode == 0, out[-3000:]
    assert not [p for p in group if psutil.pid_exists(p) and psutil.Process(p).status() != 'zombie']


def test_ros2_launch_lifecycle_autostart_and_ros2_lifecycle_set(ros_domain, tmp_path):
    """use_lifecycle:=true: the managed nodes reach active by themselves (autostart), `ros2 lifecycle set`
    moves them; with autostart:=false perception waits unconfigured for a manager."""
    for autostart, first in (('true', 'active'), ('false', 'unconfigured')):
        adaptation = autostart == 'true'
        launch = _start(['launch', 'edge_tl_ros', 'edge_tl.launch.py', 'use_lifecycle:=true',
                         f'use_adaptation:={str(adaptation).lower()}', f'autostart:={autostart}',
                         f'state_dir:={tmp_path / autostart}'], ros_domain)
        children = []
        try:
            for name in ['/perception'] + (['/adaptation'] if adaptation else []):
                _ros2_until(['lifecycle', 'get', name], ros_domain, launch,
                            ok=lambda out, first=first: out.startswith(first), timeout=60)
            children = psutil.Process(launch.pid).children(recursive=True)
            cmdlines = [' '.join(c.cmdline()) for c in children]
            assert any('perception_lifecycle_node' in c for c in cmdlines), cmdlines
            assert any('adaptation_lifecycle_node' in c for c in cmdlines) == adaptation, cmdlines
            steps = ['deactivate'] if autostart == 'true' else ['configure', 'activate']
            for step in steps:
                out = _ros2(['lifecycle', 'set', '/perception', step], ros_domain)
                assert 'Transitioning successful' in out, out
            want = 'inactive' if autostart == 'true' else 'active'
            assert _ros2(['lifecycle', 'get', '/perception'], ros_domain).startswith(want)
            if want == 'active':  # subscribed to the camera now
                _wait_for(lambda: ('/camera/image' in (t := _topics(ros_domain)), t), '/camera/image', launch)
            if adaptation:  # the adaptation node's own transitions: inactive = no collection, no rounds
                out = _ros2(['lifecycle', 'set', '/adaptation', 'deactivate'], ros_domain)
                assert 'Transitioning successful' in out, out
                out = _ros2(['service', 'call', '/adaptation/adapt_now', 'std_srvs/srv/Trigger'], ros_domain)
                assert 'success=False' in out and 'inactive' in out, out
        finally:
            rc, out = _stop(launch, children)
        assert rc == 0, out[-3000:]
        assert 'Traceback' not in out, out[-5000:]
