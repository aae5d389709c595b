"""``edge-tl up``: the launch file's graph in one process (perception + adaptation on a
MultiThreadedExecutor, same params YAML, same remappings). The nodes' ``executor_threads`` parameters
apply to their own processes only: in one process both nodes share the GIL, and one 4-thread executor for
both measured lower latency in ``edge-tl demo`` (p50 2.9 / p99 8.9 ms) than a single-threaded executor for
perception beside a multi-threaded one for adaptation (4.2 / 14.8 ms). Used where ``ros2 launch`` is not
available (pip-installed ROS) and by the tests.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / 'config' / 'edge_tl.yaml'


def default_config() -> Path:
    try:
        from ament_index_python.packages import get_package_share_directory

        p = Path(get_package_share_directory('edge_tl_ros')) / 'config' / 'edge_tl.yaml'
        if p.is_file():
            return p
    except Exception:  # not installed through ament: source tree
        pass
    return DEFAULT_CONFIG


def default_fastdds_profile() -> Path:
    """config/fastdds_large_shm.xml of the installed package (else of the source tree)."""
    return default_config().parent / 'fastdds_large_shm.xml'


def apply_fastdds_profile(path: str | None) -> str | None:
    """What the launch file does for its nodes: ``FASTDDS_DEFAULT_PROFILES_FILE`` = ``path`` (``None``: the
    package's large shared-memory profile; ``""``: leave the environment as it is). Call before
    ``rclpy.init()``. A profile the user already exported wins over the default. Returns the file in use."""
    import os

    if path == '':
        return os.environ.get('FASTDDS_DEFAULT_PROFILES_FILE')
    if path is None:
        if os.environ.get('FASTDDS_DEFAULT_PROFILES_FILE'):
            return os.environ['FASTDDS_DEFAULT_PROFILES_FILE']
        path = str(default_fastdds_profile())
    if not Path(path).expanduser().is_file():
        raise ValueError(f'Fast DDS profile {path} not found')
    os.environ['FASTDDS_DEFAULT_PROFILES_FILE'] = str(Path(path).expanduser())
    return os.environ['FASTDDS_DEFAULT_PROFILES_FILE']


def add_fastdds_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument('--fastdds-profile', default=None, metavar='XML',
                   help='Fast DDS profile (FASTDDS_DEFAULT_PROFILES_FILE) as the launch file sets it; '
                   'default: an exported FASTDDS_DEFAULT_PROFILES_FILE, else config/fastdds_large_shm.xml '
                   '(16 MiB shared-memory segments for camera-sized frames); "" leaves the environment alone')


def node_args(params_file: str | Path, camera_topic: str = '/camera/image', namespace: str = '',
              model_bundle: str = '', state_dir: str = '', use_compressed: bool | None = None) -> list[str]:
    """rcl command-line arguments shared by both nodes (what the launch file passes)."""
    args = ['--ros-args', '--params-file', str(params_file),
            '-r', f'image:={camera_topic}', '-r', f'image/compressed:={camera_topic}/compressed']
    if namespace:
        args += ['-r', f'__ns:={namespace if namespace.startswith("/") else "/" + namespace}']
    if model_bundle:
        args += ['-p', f'model_bundle:={model_bundle}']
    if state_dir:
        args += ['-p', f'state_dir:={state_dir}']
    if use_compressed is not None:
        args += ['-p', f'use_compressed:={"true" if use_compressed else "false"}']
    return args


class Bringup:
    """Both nodes in one process; ``spin_in_thread()`` for in-process use (demo, tests)."""

    def __init__(self, params_file=None, camera_topic='/camera/image', namespace='', model_bundle='',
                 state_dir='', use_adaptation=True, use_compressed=None, context=None, extra_args=()):
        from rclpy.executors import MultiThreadedExecutor

        from .perception_node import PerceptionNode

        args = node_args(params_file or default_config(), camera_topic, namespace, model_bundle,
                         state_dir, use_compressed) + list(extra_args)
        self.perception = PerceptionNode(context=context, cli_args=args)
        self.adaptation = None
        if use_adaptation:
            from .adaptation_node import AdaptationNode

            self.adaptation = AdaptationNode(context=context, cli_args=args)
        self.executor = MultiThreadedExecutor(num_threads=4, context=context)
        for n in self.nodes:
            self.executor.add_node(n)
        self._thread = None

    @property
    def nodes(self):
        return [n for n in (self.perception, self.adaptation) if n is not None]

    def spin(self):
        self.executor.spin()

    def spin_in_thread(self):
        import threading

        self._thread = threading.Thread(target=self.executor.spin, daemon=True, name='edge_tl_up')
        self._thread.start()
        return self

    def shutdown(self):
        self.executor.shutdown(timeout_sec=2.0)
        if self._thread is not None:  # before the nodes go: a spin thread left in rcl's wait at interpreter
            self._thread.join(timeout=10.0)  # exit aborts the process (rclpy#1484)
        for n in self.nodes:
            n.destroy_node()


def cmd_up(args) -> int:
    import rclpy
    from rclpy.executors import ExternalShutdownException

    from ..bundle import BundleError
    from ..engine import EngineError

    try:
        profile = apply_fastdds_profile(args.fastdds_profile)
    except ValueError as e:
        print(f'edge-tl up: cannot start: {e}')
        return 1
    print(f'edge-tl up: Fast DDS profile {profile or "(Fast DDS defaults)"}', flush=True)
    extra = [a for kv in args.param for a in ('-p', kv)] + list(args.ros_args or [])
    rclpy.init()
    try:
        up = Bringup(args.params_file, args.camera_topic, args.namespace, args.model_bundle,
                     args.state_dir, not args.no_adaptation, args.use_compressed or None, extra_args=extra)
    except (BundleError, EngineError, ValueError) as e:
        print(f'edge-tl up: cannot start: {e}')
        rclpy.try_shutdown()
        return 1
    try:
        up.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        up.shutdown()
        rclpy.try_shutdown()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser('up', help='run perception + adaptation in one process (like the launch file)',
                       description=__doc__)
    p.add_argument('--params-file', default=str(default_config()),
                   help='ROS params YAML (default: %(default)s)')
    p.add_argument('--camera-topic', default='/camera/image',
                   help='camera image topic (default: %(default)s)')
    p.add_argument('--namespace', default='', help='namespace for both nodes')
    p.add_argument('--model-bundle', default='', help='model bundle directory (default: from the YAML)')
    p.add_argument('--state-dir', default='', help='head versions + frame store directory')
    p.add_argument('--no-adaptation', action='store_true', help='run the perception node only')
    p.add_argument('--use-compressed', action='store_true', help='subscribe <camera-topic>/compressed too')
    p.add_argument('-p', '--param', action='append', default=[], metavar='NAME:=VALUE',
                   help='set a parameter of both nodes (as ros2 run ... -p NAME:=VALUE; repeatable)')
    add_fastdds_arg(p)
    p.add_argument('--ros-args', nargs=argparse.REMAINDER, default=[], metavar='ARGS',
                   help='the rest of the line goes to both nodes as ROS arguments (-p, -r, --log-level ...)')
    p.set_defaults(func=cmd_up)
