"""Parameter declaration helpers shared by the nodes (descriptions, ranges, choices)."""

from __future__ import annotations

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor


def describe(text: str, read_only: bool = False, int_range=None, float_range=None,
             choices=None) -> ParameterDescriptor:
    """A ParameterDescriptor with a description, optional range (enforced by rclpy) and choices."""
    if choices:
        text = f'{text} One of: {", ".join(choices)}.'
    d = ParameterDescriptor(description=text, read_only=read_only)
    if int_range:
        d.integer_range = [IntegerRange(from_value=int(int_range[0]), to_value=int(int_range[1]), step=1)]
    if float_range:
        d.floating_point_range = [FloatingPointRange(from_value=float(float_range[0]),
                                                     to_value=float(float_range[1]), step=0.0)]
    return d


def declare_all(node, parameters: dict) -> None:
    """Declare ``{name: (default, describe-kwargs)}`` on ``node``."""
    for name, (default, kwargs) in parameters.items():
        node.declare_parameter(name, default, describe(**kwargs))


def one_line(err: BaseException) -> str:
    """An exception as one log line (start-up failures: a clear message, no traceback)."""
    return ' | '.join(part.strip() for part in str(err).splitlines() if part.strip()) or type(err).__name__
