"""Shared pytest fixtures: an isolated ROS 2 context per test.

Kept minimal on purpose: ``ros_domain`` (a domain id unique to this test), ``ros_context``
(an initialised ``rclpy.context.Context`` on that domain, shut down after the test) and
``python_without`` (run code in a fresh interpreter where given modules cannot be imported).
Set ``EDGE_TL_TEST_DOMAIN_ID`` to pin every test to one domain id instead.
"""

import itertools
import os
import subprocess
import sys

import pytest

# DDS stays on this machine and uses Fast DDS unless the caller chose otherwise.
os.environ.setdefault('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp')
if 'ROS_LOCALHOST_ONLY' not in os.environ:  # deprecated since Jazzy; don't mix the two settings
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')

_DOMAIN_MIN, _DOMAIN_MAX = 1, 100  # safe for Fast DDS' port mapping on Linux
_counter = itertools.count()


def _next_domain_id():
    fixed = os.environ.get('EDGE_TL_TEST_DOMAIN_ID')
    if fixed:
        return int(fixed)
    span = _DOMAIN_MAX - _DOMAIN_MIN + 1
    # spread concurrent pytest processes by pid, then step through the range test by test
    return _DOMAIN_MIN + (os.getpid() * 37 + next(_counter)) % span


@pytest.fixture
def ros_domain():
    """A ROS domain id (1..100) unique to this test within the test process."""
    return _next_domain_id()


@pytest.fixture
def ros_context(ros_domain):
    """An initialised rclpy Context on ``ros_domain``; shut down after the test."""
    import rclpy
    from rclpy.context import Context

    ctx = Context()
    rclpy.init(context=ctx, domain_id=ros_domain)
    try:
        yield ctx
    finally:
        if ctx.ok():
            rclpy.shutdown(context=ctx)


@pytest.fixture
def python_without():
    """``run(modules, code) -> stdout``: ``code`` in a fresh interpreter where ``modules`` cannot be
    imported (the robot runtime has no torch); fails the test with stderr if it exits non-zero."""
    def run(modules, code: str, timeout: float = 60) -> str:
        block = ''.join(f'sys.modules[{m!r}] = None\n' for m in modules)
        out = subprocess.run([sys.executable, '-c', 'import sys\n' + block + code], capture_output=True,
                             text=True, timeout=timeout)
        assert out.returncode == 0, out.stderr
        return out.stdout
    return run
