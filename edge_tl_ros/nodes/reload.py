"""Asks the perception node to load a new head: ``<perception_node>/reload_head``, asynchronously.

Used by the adaptation node after an accepted round. Never blocks an executor thread for long (a
2 s discovery wait from the round thread, then ``call_async``); a perception node that never answers
is given up on after :data:`RELOAD_TIMEOUT_S` (:meth:`HeadReloader.check_timeout`, from a timer). A
perception node that is not running loads the registry's current head when it starts, so a failed
call loses nothing.
"""

from __future__ import annotations

import time

from rclpy.callback_groups import ReentrantCallbackGroup
from std_srvs.srv import Trigger

RELOAD_TIMEOUT_S = 10.0  # a reload_head call without an answer (perception killed mid-call) gives up


class HeadReloader:
    """``request(version)`` calls ``<perception_node>/reload_head``; :attr:`state` says how it went."""

    def __init__(self, node, perception_node: str, on_done=None):
        self.node = node
        self.on_done = on_done or (lambda: None)
        self._group = ReentrantCallbackGroup()
        self._clients: dict[str, object] = {}
        self._pending = None  # (future, client, monotonic time sent) of an unanswered call
        self.state: dict | None = None
        self.perception_node = perception_node
        self.client()  # discover the perception service early

    def client(self):
        name = self.perception_node.rstrip('/')
        cli = self._clients.get(name)
        if cli is None:
            cli = self.node.create_client(Trigger, f'{name}/reload_head', callback_group=self._group)
            self._clients[name] = cli
        return cli

    def request(self, version: int) -> None:
        log = self.node.get_logger()
        cli = self.client()
        self.state = info = {'version': version, 'service': cli.srv_name, 'done': False, 'success': None,
                             'message': 'waiting for the service'}
        if not cli.wait_for_service(timeout_sec=2.0):
            info.update(done=True, success=False,
                        message=f'{cli.srv_name} not available; the perception node loads v{version} (the '
                                'registry\'s current head) when it starts')
            log.warning(info['message'])
            return
        future = cli.call_async(Trigger.Request())
        self._pending = (future, cli, time.monotonic())

        def done(fut):
            if info['done']:  # already given up on (timeout)
                return
            try:
                res = fut.result()
                info.update(done=True, success=bool(res.success), message=res.message)
            except Exception as e:  # the service went away
                info.update(done=True, success=False, message=f'{type(e).__name__}: {e}')
            # one call site per severity: rclpy raises "Logger severity cannot be changed between calls"
            if info['success']:
                log.info(f'{info["service"]}: {info["message"]}')
            else:
                log.warning(f'{info["service"]}: {info["message"]}')
            self.on_done()

        future.add_done_callback(done)

    def check_timeout(self) -> None:
        """A perception node that dies after taking the request never answers (its service can stay
        discovered for a while): give up after RELOAD_TIMEOUT_S, say so, and drop the pending request."""
        if self._pending is None:
            return
        future, cli, t = self._pending
        if future.done():
            self._pending = None
        elif time.monotonic() - t > RELOAD_TIMEOUT_S:
            self._pending = None
            info = self.state
            info.update(done=True, success=False,
                        message=f'{cli.srv_name} did not answer in {RELOAD_TIMEOUT_S:.0f} s; the perception '
                                f'node loads v{info["version"]} (the registry\'s current head) when it '
                                'starts')
            self.node.get_logger().warning(info['message'])
            cli.remove_pending_request(future)
            future.cancel()
