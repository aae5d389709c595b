"""The one /diagnostics builder of both nodes, and fault counts over a recent window."""

from __future__ import annotations

import collections
import time

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

OK, WARN, ERROR = DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR


def diagnostic_array(node, what: str, hardware_id: str, problems: list, values: dict,
                     ok_message: str = 'ok', extra=()) -> DiagnosticArray:
    """One DiagnosticStatus ``'<node name>: <what>'``: the worst level of ``problems`` (``[(level, text)]``),
    their texts joined (``ok_message`` when there are none), ``values`` as key/value strings; then one more
    status per ``(what, problems, values)`` in ``extra`` (e.g. each camera), built the same way."""
    def status(what, problems, values):
        st = DiagnosticStatus(name=f'{node.get_fully_qualified_name()}: {what}', hardware_id=hardware_id)
        st.level = max((lvl for lvl, _ in problems), default=OK)
        st.message = '; '.join(text for _, text in problems) or ok_message
        st.values = [KeyValue(key=str(k), value=str(v)) for k, v in values.items()]
        return st

    arr = DiagnosticArray(status=[status(what, problems, values)] +
                          [status(*e) for e in extra])
    arr.header.stamp = node.get_clock().now().to_msg()
    return arr


class RecentCounts:
    """How much each of some all-time counters grew over the last ``window_s`` (a WARN says what is wrong
    now, not what once was)."""

    def __init__(self, window_s: float = 10.0):
        self.window_s = float(window_s)
        self._hist: collections.deque = collections.deque([(time.monotonic(), {})])

    def update(self, counts: dict) -> dict:
        now = time.monotonic()
        hist = self._hist
        hist.append((now, dict(counts)))
        while len(hist) > 1 and now - hist[1][0] >= self.window_s:
            hist.popleft()
        return {k: v - hist[0][1].get(k, 0) for k, v in counts.items()}
