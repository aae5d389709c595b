import os
from glob import glob

from setuptools import find_packages, setup

package_name = 'edge_tl_ros'

# Directories installed (recursively, keeping their structure) under share/edge_tl_ros.
SHARE_DIRS = ('launch', 'config', 'models')


def _is_installed_file(root, rel_path):
    """Return True for files that belong in share/ (no caches, no hidden files)."""
    parts = rel_path.split(os.sep)
    if any(p == '__pycache__' or p.startswith('.') for p in parts):
        return False
    return os.path.isfile(os.path.join(root, rel_path)) and not rel_path.endswith(('.pyc', '.pyo'))


def share_data_files(top_dirs=SHARE_DIRS):
    """data_files entries for every file under top_dirs, e.g.

    models/gtsrb_student/manifest.yaml -> share/edge_tl_ros/models/gtsrb_student/manifest.yaml
    """
    here = os.path.dirname(os.path.abspath(__file__))
    entries = {}
    for top in top_dirs:
        for path in sorted(glob(os.path.join(top, '**', '*'), recursive=True, root_dir=here)):
            if not _is_installed_file(here, path):
                continue
            dest = os.path.join('share', package_name, os.path.dirname(path))
            entries.setdefault(dest, []).append(path)
    return sorted(entries.items())


setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(exclude=['test', 'test.*', 'bench', 'bench.*', 'tools', 'tools.*']),
    data_files=[
        ('share/ament_index/resource_index/packages',
            ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
    ] + share_data_files(),
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='edge_tl_ros maintainers',
    maintainer_email='edge-tl@example.com',
    description='Edge transfer learning for ROS 2: ONNX Runtime perception node, '
                'on-robot adaptation node and the edge-tl CLI.',
    license='Apache-2.0',
    extras_require={
        'test': [
            'pytest',
        ],
    },
    entry_points={
        'console_scripts': [
            'perception_node = edge_tl_ros.nodes.perception_node:main',
            'perception_lifecycle_node = edge_tl_ros.nodes.perception_node:lifecycle_main',
            'adaptation_node = edge_tl_ros.nodes.adaptation_node:main',
            'adaptation_lifecycle_node = edge_tl_ros.nodes.adaptation_node:lifecycle_main',
            'edge-tl = edge_tl_ros.cli:main',
        ],
    },
)
