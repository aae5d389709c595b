"""launch/edge_tl.launch.py structure and `edge-tl up`, without the launch packages installed.

The launch file is executed against recording stand-ins of the launch API, so the checks see exactly
the actions it builds even where launch_ros is absent; the nodes are then started with the shipped
YAML on real rclpy. The real `ros2 launch` / `ros2 run` / ros2cli checks are in test_ros2_cli.py.
"""

import ast
import importlib.util
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / 'launch' / 'edge_tl.launch.py'
CONFIG = ROOT / 'config' / 'edge_tl.yaml'


class _Rec:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class LaunchConfiguration(_Rec):
    used: set = set()

    def __init__(self, name, *a, **k):
        super().__init__(name, *a, **k)
        LaunchConfiguration.used.add(name)


def _run_launch_file():
    mods = {n: types.ModuleType(n) for n in (
        'launch', 'launch.actions', 'launch.conditions', 'launch.events', 'launch.substitutions',
        'launch_ros',
        'launch_ros.actions', 'launch_ros.event_handlers', 'launch_ros.events', 'launch_ros.events.lifecycle',
        'ament_index_python', 'ament_index_python.packages')}
    mods['launch'].LaunchDescription = type('LaunchDescription', (_Rec,), {})
    for name in ('DeclareLaunchArgument', 'SetEnvironmentVariable', 'EmitEvent', 'RegisterEventHandler'):
        setattr(mods['launch.actions'], name, type(name, (_Rec,), {}))
    mods['launch.conditions'].IfCondition = type('IfCondition', (_Rec,), {})
    mods['launch.conditions'].UnlessCondition = type('UnlessCondition', (_Rec,), {})
    mods['launch.events'].matches_action = lambda action: ('matches', action)
    mods['launch.substitutions'].LaunchConfiguration = LaunchConfiguration
    mods['launch.substitutions'].PythonExpression = type('PythonExpression', (_Rec,), {})
    mods['launch.substitutions'].AndSubstitution = type('AndSubstitution', (_Rec,), {})
    mods['launch.substitutions'].NotSubstitution = type('NotSubstitution', (_Rec,), {})
    mods['launch_ros.actions'].Node = type('Node', (_Rec,), {})
    mods['launch_ros.actions'].LifecycleNode = type('LifecycleNode', (_Rec,), {})
    mods['launch_ros.event_handlers'].OnStateTransition = type('OnStateTransition', (_Rec,), {})
    mods['launch_ros.events.lifecycle'].ChangeState = type('ChangeState', (_Rec,), {})
    mods['ament_index_python.packages'].get_package_share_directory = lambda pkg: str(ROOT)
    saved = {n: sys.modules.get(n) for n in mods}
    sys.modules.update(mods)
    try:
        LaunchConfiguration.used = set()
        spec = importlib.util.spec_from_file_location('edge_tl_launch', LAUNCH)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.generate_launch_description()
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def _console_scripts():
    tree = ast.parse((ROOT / 'setup.py').read_text())
    scripts = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and '=' in node.value \
                and ':' in node.value:
            name, target = (s.strip() for s in node.value.split('=', 1))
            scripts[name] = target
    return scripts


def test_launch_file_structure():
    ld = _run_launch_file()
    actions = ld.args[0]
    declared = {a.args[0] for a in actions if type(a).__name__ == 'DeclareLaunchArgument'}
    nodes = [a for a in actions if type(a).__name__ in ('Node', 'LifecycleNode')]
    assert {'camera_topic', 'model_bundle', 'use_adaptation', 'use_compressed', 'namespace',
            'use_lifecycle', 'autostart'} <= declared
    assert declared == LaunchConfiguration.used, 'every launch argument is used, every use is declared'
    scripts = _console_scripts()
    assert {n.kwargs['executable'] for n in nodes} == {'perception_node', 'perception_lifecycle_node',
                                                       'adaptation_node', 'adaptation_lifecycle_node'}
    for name in ('perception', 'adaptation'):  # same graph names either way, exactly one of them runs
        named = [n for n in nodes if n.kwargs['name'] == name]
        pair = {type(n).__name__: n for n in named}
        assert len(named) == 2 and set(pair) == {'Node', 'LifecycleNode'}, named
        assert pair['LifecycleNode'].kwargs['executable'] == pair['Node'].kwargs['executable'].replace(
            '_node', '_lifecycle_node')
        cond_plain = pair['Node'].kwargs['condition'].args[0]
        cond_managed = pair['LifecycleNode'].kwargs['condition'].args[0]
        if name == 'perception':  # not use_lifecycle / use_lifecycle
            assert type(cond_plain).__name__ == 'NotSubstitution'
            assert cond_plain.args[0].args[0] == 'use_lifecycle' and cond_managed.args[0] == 'use_lifecycle'
        else:  # the same, and use_adaptation
            assert type(cond_plain).__name__ == type(cond_managed).__name__ == 'AndSubstitution'
            assert cond_plain.args[1].args[0] == cond_managed.args[1].args[0] == 'use_adaptation'
    # autostart: configure emitted at launch, activate once a node reaches inactive (2 per managed node)
    events = [a for a in actions if type(a).__name__ in ('EmitEvent', 'RegisterEventHandler')]
    assert len(events) == 4 and all(type(e.kwargs['condition']).__name__ == 'IfCondition' for e in events)
    for n in nodes:
        assert n.kwargs['package'] == 'edge_tl_ros'
        assert n.kwargs['executable'] in scripts, 'launch references an executable setup.py declares'
        module, func = scripts[n.kwargs['executable']].split(':')
        assert callable(getattr(importlib.import_module(module), func))
        params_file = next(a for a in actions if type(a).__name__ == 'DeclareLaunchArgument'
                           and a.args[0] == 'params_file').kwargs['default_value']
        assert Path(params_file).is_file()
    assert all('condition' in n.kwargs for n in nodes)  # plain or managed; adaptation optional
    env = [a for a in actions if type(a).__name__ == 'SetEnvironmentVariable']
    assert env and env[0].args[0] == 'FASTDDS_DEFAULT_PROFILES_FILE'
    profile = next(a for a in actions if type(a).__name__ == 'DeclareLaunchArgument'
                   and a.args[0] == 'fastdds_profile').kwargs['default_value']
    assert Path(profile).is_file() and '<segment_size>' in Path(profile).read_text()


def _flat(d: dict, prefix: str = '') -> dict:
    """Nested YAML groups -> dotted parameter names (as rcl reads a params file)."""
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f'{prefix}{k}.') if isinstance(v, dict) else {f'{prefix}{k}': v})
    return out


def _yaml_params():
    data = yaml.safe_load(CONFIG.read_text())
    return {key.split('/')[-1]: _flat(val['ros__parameters']) for key, val in data.items()}


def test_yaml_values_are_the_node_defaults():
    """ros2 run (node defaults) and ros2 launch (the YAML) behave the same: one default per parameter."""
    from edge_tl_ros.nodes.adaptation_node import PARAMETERS as ADAPTATION
    from edge_tl_ros.nodes.perception_node import PARAMETERS as PERCEPTION

    params = _yaml_params()
    for name, table in (('perception', PERCEPTION), ('adaptation', ADAPTATION)):
        assert set(params[name]) == set(table), name
        differ = {k: (v, table[k][0]) for k, v in params[name].items() if v != table[k][0]}
        assert not differ, f'{name}: YAML value != node default: {differ}'


def test_every_yaml_parameter_is_declared_by_its_node(ros_context, tmp_path):
    from rclpy.parameter import Parameter

    from edge_tl_ros.nodes import adaptation_node, perception_node
    from edge_tl_ros.nodes.adaptation_node import AdaptationNode
    from edge_tl_ros.nodes.params import value as param_value
    from edge_tl_ros.nodes.perception_node import PerceptionNode
    from edge_tl_ros.toy import make_toy_bundle

    declared = {'perception': perception_node.PARAMETERS, 'adaptation': adaptation_node.PARAMETERS}
    toy = make_toy_bundle(tmp_path / 'toy')
    params = _yaml_params()
    assert set(params) == {'perception', 'adaptation'}
    over = [Parameter('model_bundle', value=str(toy)), Parameter('state_dir', value=str(tmp_path / 's'))]
    for cls, name in ((PerceptionNode, 'perception'), (AdaptationNode, 'adaptation')):
        extra = [Parameter('teacher_bundle', value='')] if name == 'adaptation' else []
        node = cls(context=ros_context, cli_args=['--ros-args', '--params-file', str(CONFIG)],
                   parameter_overrides=over + extra)
        try:
            for key, value in params[name].items():
                assert node.has_parameter(key), f'{name}: {key} in the YAML is not declared'
                if key not in ('model_bundle', 'state_dir', 'teacher_bundle'):
                    got = param_value(node, key, declared[name])  # an empty string array is unset in rclpy
                    assert got == value or list(got) == value, key
        finally:
            node.destroy_node()


def test_edge_tl_up_serves_a_classification(ros_context, ros_domain, tmp_path):
    """`edge-tl up` (subprocess, shipped YAML) starts both nodes and answers a real frame."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image
    from vision_msgs.msg import Classification

    from edge_tl_ros.imaging import image_fields
    from edge_tl_ros.toy import make_toy_bundle

    toy = make_toy_bundle(tmp_path / 'toy')
    env = dict(os.environ, ROS_DOMAIN_ID=str(ros_domain), PYTHONUNBUFFERED='1')
    env.pop('FASTDDS_DEFAULT_PROFILES_FILE', None)
    proc = subprocess.Popen(
        [sys.executable, '-m', 'edge_tl_ros.cli', 'up', '--model-bundle', str(toy), '--state-dir',
         str(tmp_path / 'state'), '--camera-topic', '/cam/image', '-p', 'top_k:=2',
         '-p', 'execution_provider:=cuda', '--ros-args', '-p', 'score_threshold:=0.0'],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    node = rclpy.create_node('probe', context=ros_context)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(node)
    got = []
    node.create_subscription(Classification, '/perception/classification', got.append, 10)
    pub = node.create_publisher(Image, '/cam/image',
                                QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE))
    img = np.zeros((32, 32, 3), np.uint8)
    img[..., 1] = 210
    try:
        deadline = time.monotonic() + 60
        while not got and time.monotonic() < deadline and proc.poll() is None:
            msg = Image(**image_fields(img, 'rgb8'))
            msg.header.stamp.sec = 42
            pub.publish(msg)
            executor.spin_once(timeout_sec=0.2)
        assert proc.poll() is None, proc.stdout.read()
        assert got, 'no classification from edge-tl up'
        assert got[0].results[0].class_id == 'green' and got[0].header.stamp.sec == 42
        assert len(got[0].results) == 2  # -p top_k:=2 reached the node
        names = {n for n, _ in node.get_node_names_and_namespaces()}
        assert {'perception', 'adaptation'} <= names
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        node.destroy_node()
    # the launch file's large shared-memory Fast DDS profile, applied without being asked
    assert 'Fast DDS profile' in out and 'fastdds_large_shm.xml' in out, out[-2000:]
    # this onnxruntime has no CUDA: the node says so at WARN and runs on the CPU
    assert "execution_provider 'cuda' is not available" in out and 'WARN' in out, out[-2000:]


def test_fastdds_profile_defaults_like_the_launch_file(monkeypatch, tmp_path):
    from edge_tl_ros.nodes.bringup import apply_fastdds_profile, default_fastdds_profile

    monkeypatch.delenv('FASTDDS_DEFAULT_PROFILES_FILE', raising=False)
    assert apply_fastdds_profile('') is None and 'FASTDDS_DEFAULT_PROFILES_FILE' not in os.environ
    assert apply_fastdds_profile(None) == str(default_fastdds_profile())
    assert '<profiles' in Path(os.environ['FASTDDS_DEFAULT_PROFILES_FILE']).read_text()
    mine = tmp_path / 'mine.xml'
    mine.write_text('<profiles/>')
    monkeypatch.setenv('FASTDDS_DEFAULT_PROFILES_FILE', str(mine))
    assert apply_fastdds_profile(None) == str(mine)  # the user's exported profile wins over the default
    with pytest.raises(ValueError, match='not found'):
        apply_fastdds_profile(str(tmp_path / 'nope.xml'))
