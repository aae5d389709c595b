"""Launch perception_node (+ adaptation_node) with config/edge_tl.yaml.

    ros2 launch edge_tl_ros edge_tl.launch.py camera_topic:=/front_camera/image_raw use_adaptation:=true
    ros2 launch edge_tl_ros edge_tl.launch.py use_lifecycle:=true autostart:=false   # managed perception

use_lifecycle:=true runs both nodes as lifecycle nodes (perception_lifecycle_node, adaptation_lifecycle_node);
autostart:=true (the default) configures and activates them at launch, autostart:=false leaves them
unconfigured for a lifecycle manager or ``ros2 lifecycle set /perception configure``.

The same graph runs in one process without launch_ros as ``edge-tl up`` (same YAML, same remaps).
"""

import os

import lifecycle_msgs.msg
from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, EmitEvent, RegisterEventHandler, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.events import matches_action
from launch.substitutions import AndSubstitution, LaunchConfiguration, NotSubstitution, PythonExpression
from launch_ros.actions import LifecycleNode, Node
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState


def generate_launch_description():
    share = get_package_share_directory('edge_tl_ros')
    default_params = os.path.join(share, 'config', 'edge_tl.yaml')

    camera_topic = LaunchConfiguration('camera_topic')
    model_bundle = LaunchConfiguration('model_bundle')
    use_adaptation = LaunchConfiguration('use_adaptation')
    use_compressed = LaunchConfiguration('use_compressed')
    namespace = LaunchConfiguration('namespace')
    params_file = LaunchConfiguration('params_file')
    state_dir = LaunchConfiguration('state_dir')
    fastdds_profile = LaunchConfiguration('fastdds_profile')
    use_lifecycle = LaunchConfiguration('use_lifecycle')
    autostart = LaunchConfiguration('autostart')

    args = [
        DeclareLaunchArgument('camera_topic', default_value='/camera/image',
                              description='sensor_msgs/Image topic to classify (+ /compressed)'),
        DeclareLaunchArgument('model_bundle',
                              default_value=os.path.join(share, 'models', 'gtsrb_student'),
                              description='student model bundle directory'),
        DeclareLaunchArgument('use_adaptation', default_value='true',
                              description='also run adaptation_node (on-robot head fine-tuning)'),
        DeclareLaunchArgument('use_compressed', default_value='false',
                              description='subscribe <camera_topic>/compressed (JPEG/PNG) as well'),
        DeclareLaunchArgument('namespace', default_value='', description='namespace for both nodes'),
        DeclareLaunchArgument('params_file', default_value=default_params,
                              description='ROS parameters YAML for both nodes'),
        DeclareLaunchArgument('state_dir', default_value='',
                              description='head versions + frame store '
                                          '("" = $ROS_HOME/edge_tl_ros/<bundle>)'),
        DeclareLaunchArgument('fastdds_profile',
                              default_value=os.path.join(share, 'config', 'fastdds_large_shm.xml'),
                              description='Fast DDS profile for the nodes (16 MiB shared-memory segment: '
                                          'camera-sized frames; the camera driver needs it too)'),
        DeclareLaunchArgument('use_lifecycle', default_value='false',
                              description='run the nodes as lifecycle (managed) nodes'),
        DeclareLaunchArgument('autostart', default_value='true',
                              description='with use_lifecycle: configure and activate them at launch'),
    ]
    remaps = [('image', camera_topic),
              ('image/compressed', PythonExpression(["'", camera_topic, "' + '/compressed'"]))]
    overrides = {'model_bundle': model_bundle, 'use_compressed': use_compressed, 'state_dir': state_dir}

    common = dict(namespace=namespace, parameters=[params_file, overrides], remappings=remaps,
                  output='screen', emulate_tty=True)
    lifecycle = []  # plain node unless use_lifecycle; the managed one, autostarted, if it is

    def node(name, executable, only_if=None):
        def when(*conds):  # every condition true (and only_if, when given)
            conds = conds + ((only_if,) if only_if is not None else ())
            out = conds[0]
            for c in conds[1:]:
                out = AndSubstitution(out, c)
            return IfCondition(out)
        plain = Node(package='edge_tl_ros', executable=executable, name=name,
                     condition=when(NotSubstitution(use_lifecycle)), **common)
        managed = LifecycleNode(package='edge_tl_ros', name=name, condition=when(use_lifecycle),
                                executable=executable.replace('_node', '_lifecycle_node'), **common)
        start = when(use_lifecycle, autostart)
        transition = lifecycle_msgs.msg.Transition
        lifecycle.append(RegisterEventHandler(OnStateTransition(
            target_lifecycle_node=managed, start_state='configuring', goal_state='inactive',
            entities=[EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(managed),
                                                  transition_id=transition.TRANSITION_ACTIVATE))]),
            condition=start))
        lifecycle.append(EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(managed),
                                                     transition_id=transition.TRANSITION_CONFIGURE),
                                   condition=start))
        return [plain, managed]
    nodes = node('perception', 'perception_node') + node('adaptation', 'adaptation_node',
                                                         only_if=use_adaptation)
    env = SetEnvironmentVariable('FASTDDS_DEFAULT_PROFILES_FILE', fastdds_profile)
    return LaunchDescription(args + [env, *nodes, *lifecycle])
