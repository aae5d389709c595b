"""The robot's fleet worker (no ROS): a background thread that takes part in fleet sessions.

:class:`FleetConfig` is the adaptation node's ``fleet.*`` parameters (:mod:`edge_tl_ros.settings`).
:class:`FleetWorker` waits for :meth:`~FleetWorker.trigger` (an accepted local round) or ``period_s``,
then runs one Flower client session (:func:`edge_tl_ros.fleet.client.run_client`) with the node's
``offer`` and ``judge`` callbacks. A server that is down or a session that fails is counted
(``failures``, ``last_error``) and retried with exponential backoff (``retry_min_s`` doubling up to
``retry_max_s``); nothing it does can raise into the node. Flower is imported in the thread only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..settings import check, setting


@dataclass
class FleetConfig:
    """The adaptation node's ``fleet.*`` parameters."""

    enabled: bool = setting(False, 'fleet.enabled', 'Take part in fleet learning: offer the accepted head '
                            '(weights, class names, label counts; never frames) to a fleet server.',
                            read_only=True)
    server_address: str = setting('127.0.0.1:9092', 'fleet.server_address',
                                  'host:port of the fleet server (edge-tl fleet-server).', read_only=True)
    tls_root_cert: str = setting('', 'fleet.tls_root_cert', 'PEM root certificate of the fleet server '
                                 '(TLS); "" = insecure connection.', read_only=True)
    robot_name: str = setting('', 'fleet.robot_name', 'Name this robot reports to the fleet server ("" = '
                              'the node\'s fully qualified name).', read_only=True)
    period_s: float = setting(0.0, 'fleet.period_s', 'Also join a fleet session this often (0 = only after '
                              'an accepted round).', (0.0, 1e7))
    local_training: bool = setting(False, 'fleet.local_training', 'Federated training: every fleet round '
                                   'trains the round\'s recipe from the fleet head on the stored labelled '
                                   'frames and offers that (false = offer the deployed head).')
    margin: float = setting(0.0, 'fleet.margin', 'A fleet head must beat the current head on the local '
                            'holdout by this much (the anchor check applies too).', (-1.0, 1.0))
    dp_clip: float = setting(0.0, 'fleet.dp_clip', 'Local differential privacy: clip the head update to '
                             'this L2 norm before sending (0 = off).', (0.0, 1e6))
    dp_noise: float = setting(0.0, 'fleet.dp_noise', 'Local differential privacy: Gaussian noise of '
                              'dp_noise * dp_clip standard deviation on every sent coordinate.', (0.0, 100.0))
    retry_min_s: float = setting(5.0, 'fleet.retry_min_s', 'First retry delay after a failed session '
                                 '(doubles up to fleet.retry_max_s).', (0.01, 3600.0))
    retry_max_s: float = setting(300.0, 'fleet.retry_max_s', 'Longest retry delay.', (0.01, 86400.0))
    session_timeout_s: float = setting(600.0, 'fleet.session_timeout_s', 'Give up connecting to the fleet '
                                       'server after this long.', (1.0, 1e6))

    def validate(self) -> None:
        check(self)


class FleetWorker:
    """One fleet session at a time in a daemon thread; see the module docstring."""

    def __init__(self, cfg: FleetConfig, robot: str, offer: Callable, judge: Callable,
                 log: Callable[[str], None] = print):
        self.cfg, self.robot, self.offer, self.judge, self.log = cfg, robot, offer, judge, log
        self.sessions = self.failures = self.accepted = self.rejected = 0
        self.last_error: str | None = None
        self.last_result: dict | None = None
        self.running = False
        self.bytes_sent = 0
        self._due = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._delay = 0.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name='edge_tl_fleet', daemon=True)
        self._thread.start()

    def trigger(self, why: str = '') -> None:
        self._due.set()

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        self._due.set()
        if self._thread is not None:
            self._thread.join(timeout)  # a session blocked on the server ends with the process

    def status(self) -> dict:
        return {'enabled': True, 'server': self.cfg.server_address, 'running': self.running,
                'sessions': self.sessions, 'accepted': self.accepted, 'rejected': self.rejected,
                'failures': self.failures, 'last_error': self.last_error, 'retry_in_s': self._delay,
                'bytes_sent': self.bytes_sent, 'last': self.last_result}

    def _judge(self, fleet, final):
        out = self.judge(fleet, final)
        if final:
            if out.get('accepted'):
                self.accepted += 1
            else:
                self.rejected += 1
            self.last_result = {k: v for k, v in out.items() if isinstance(v, (bool, int, float, str))}
        return out

    def _session(self) -> None:
        from .client import FleetClient, MessageLog, run_client

        logging.getLogger('flwr').setLevel(logging.WARNING)  # Flower logs every message at INFO
        cert = self.cfg.tls_root_cert or None
        if cert is not None:
            with open(cert, 'rb') as f:
                cert = f.read()
        client = FleetClient(self.robot, self.offer, self._judge, self.cfg.dp_clip, self.cfg.dp_noise)
        log = MessageLog()
        try:
            run_client(client, self.cfg.server_address, root_certificates=cert, max_retries=None,
                       max_wait_time=self.cfg.session_timeout_s, log=log)
        finally:
            self.bytes_sent += sum(r['bytes'] for r in log.records)
        if not client.fleet_heads:
            raise RuntimeError('the session ended without a fleet head')

    def _loop(self) -> None:
        period = self.cfg.period_s
        while not self._stop.is_set():
            self._due.wait(timeout=period if period > 0 else None)
            if self._stop.is_set():
                return
            self._due.clear()
            while not self._stop.is_set():
                self.running = True
                try:
                    self._session()
                except BaseException as e:  # a server down, TLS, a bad message: counted, retried
                    self.failures += 1
                    self.last_error = f'{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ""}'
                    self._delay = min(self.cfg.retry_max_s, max(self.cfg.retry_min_s, 2 * self._delay))
                    self.log(f'fleet session failed ({self.last_error}); retrying in {self._delay:.0f} s')
                else:
                    self.sessions += 1
                    self._delay = 0.0
                    self.last_error = None
                    break
                finally:
                    self.running = False
                t_end = time.monotonic() + self._delay
                while not self._stop.is_set() and time.monotonic() < t_end:
                    self._stop.wait(min(1.0, t_end - time.monotonic()))
