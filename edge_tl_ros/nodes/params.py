"""Parameter declaration helpers shared by the nodes (descriptions, ranges, choices)."""

from __future__ import annotations

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType


def describe(text: str, read_only: bool = False, int_range=None, float_range=None,
             choices=None, string_array: bool = False) -> ParameterDescriptor:
    """A ParameterDescriptor with a description, optional range (enforced by rclpy) and choices;
    ``string_array``: typed as a string array (an empty default has no type of its own)."""
    if choices:
        text = f'{text} One of: {", ".join(choices)}.'
    d = ParameterDescriptor(description=text, read_only=read_only)
    if string_array:
        d.type = ParameterType.PARAMETER_STRING_ARRAY
    if int_range:
        d.integer_range = [IntegerRange(from_value=int(int_range[0]), to_value=int(int_range[1]), step=1)]
    if float_range:
        d.floating_point_range = [FloatingPointRange(from_value=float(float_range[0]),
                                                     to_value=float(float_range[1]), step=0.0)]
    return d


def declare_all(node, parameters: dict) -> None:
    """Declare ``{name: (default, describe-kwargs)}`` on ``node``. An empty string-array default is declared
    by type (rclpy would type ``[]`` as a byte array); read it with :func:`value`."""
    from rclpy.parameter import Parameter

    for name, (default, kwargs) in parameters.items():
        if kwargs.get('string_array') and not default:
            default = Parameter.Type.STRING_ARRAY
        node.declare_parameter(name, default, describe(**kwargs))


def value(node, name: str, parameters: dict):
    """A parameter's value; an unset string array (declared by type, or ``[]`` in a YAML) is its default."""
    from rclpy.exceptions import ParameterUninitializedException

    try:
        v = node.get_parameter(name).value
    except ParameterUninitializedException:
        return list(parameters[name][0])
    return list(v) if parameters[name][1].get('string_array') else v


def one_line(err: BaseException) -> str:
    """An exception as one log line (start-up failures: a clear message, no traceback)."""
    return ' | '.join(part.strip() for part in str(err).splitlines() if part.strip()) or type(err).__name__


def make_executor(node, num_threads: int = 3, context=None):
    """The executor ``main()`` spins ``node`` on: the node's ``executor_threads`` (or
    ``advanced.executor_threads``) parameter if it declares one (1 = SingleThreadedExecutor), else a
    MultiThreadedExecutor with ``num_threads`` threads."""
    from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor

    for name in ('executor_threads', 'advanced.executor_threads'):
        if node.has_parameter(name):
            num_threads = int(node.get_parameter(name).value)
    if num_threads <= 1:
        return SingleThreadedExecutor(context=context)
    return MultiThreadedExecutor(num_threads=num_threads, context=context)


def run_node(factory, name: str, num_threads: int = 3, args=None) -> int:
    """``main()`` of a node: start-up errors give one log line and exit 1; spin on :func:`make_executor`."""
    import rclpy
    from rclpy.exceptions import ParameterException
    from rclpy.executors import ExternalShutdownException

    from ..bundle import BundleError
    from ..engine import EngineError

    rclpy.init(args=args)
    try:
        node = factory()
    except (BundleError, EngineError, ValueError, OSError, ParameterException) as e:
        # one line, no traceback: what is wrong and where
        rclpy.logging.get_logger(name).fatal(f'cannot start: {one_line(e)}')
        rclpy.try_shutdown()
        return 1
    executor = make_executor(node, num_threads)
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0
