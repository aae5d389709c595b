"""The robot side of the fleet: a Flower client that offers a head and judges the fleet head it gets back.

:class:`FleetClient` is a :class:`flwr.client.NumPyClient`:

- ``fit``: offers ``offer(fleet_head)`` -> ``(head, label_counts)``: the robot's accepted head (or, for
  multi-round federated training, a head trained locally from the fleet head), optionally with local
  differential privacy (:func:`edge_tl_ros.fleet.update.dp_update`). It returns the head's two arrays,
  its number of trusted labels and scalars only: class names (one string), label counts by source,
  the robot's name.
- ``evaluate``: gets the fleet head; ``judge(fleet_head, final)`` -> metrics (on the last round of a
  session the robot's gate decides and, if it accepts, registers it). Returns scalars only.

:func:`run_client` connects it over Flower's gRPC transport (TLS with ``root_certificates``) and returns
when the server ends the session. :class:`MessageLog` is a Flower client mod that records every message
the client sends (type, serialised bytes, and optionally the content itself: the privacy test inspects
it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
from flwr.client import NumPyClient
from flwr.common import serde

from ..bundle import Head
from .update import arrays_head, decode_names, dp_update, encode_names, head_arrays

LABEL_KEYS = ('topic', 'teacher', 'self')


def snapshot(content) -> dict:
    """A copy of a message's RecordDict taken before the transport serialises (and consumes) it:
    record name -> ('arrays', [numpy arrays]) or (record kind, {key: value})."""
    from flwr.common import bytes_to_ndarray

    out = {}
    for name, record in content.items():
        kind = type(record).__name__
        if kind == 'ArrayRecord':
            out[name] = ('arrays', [bytes_to_ndarray(a.data) if a.stype == 'numpy.ndarray' else a.numpy()
                                    for a in record.values()])
        else:
            out[name] = (kind, dict(record))
    return out


class MessageLog:
    """Client mod: one record per message the client sends (``keep``: a :func:`snapshot` of its
    content too)."""

    def __init__(self, keep: bool = False):
        self.keep = keep
        self.records: list[dict] = []
        self._lock = threading.Lock()

    def __call__(self, msg, ctxt, call_next):
        out = call_next(msg, ctxt)
        rec = {'type': out.metadata.message_type,
               'bytes': serde.recorddict_to_proto(out.content).ByteSize() if out.has_content() else 0}
        if self.keep:
            rec['content'] = snapshot(out.content) if out.has_content() else {}
        with self._lock:
            self.records.append(rec)
        return out

    def bytes_by_type(self) -> dict:
        out: dict = {}
        for r in self.records:
            out[r['type']] = out.get(r['type'], 0) + r['bytes']
        return out


class FleetClient(NumPyClient):
    """See the module docstring. ``offer(fleet_head or None)`` -> (Head, label counts by source);
    ``judge(fleet_head, final: bool)`` -> dict of scalars (``accepted``, ``holdout_acc_fleet``, ...)."""

    def __init__(self, robot: str, offer: Callable, judge: Callable | None = None, dp_clip: float = 0.0,
                 dp_noise: float = 0.0, seed: int | None = None):
        self.robot, self.offer, self.judge = str(robot), offer, judge
        self.dp_clip, self.dp_noise = float(dp_clip), float(dp_noise)
        self.rng = np.random.default_rng(seed)
        self.fleet_heads: list[Head] = []
        self.offers = 0

    @staticmethod
    def fleet_head(parameters, config) -> Head | None:
        names = decode_names(str(config.get('class_names', '')))
        if not names or len(parameters) != 2:
            return None
        try:
            return arrays_head(parameters, names, int(config.get('round', 0)))
        except ValueError:  # BundleError: shapes that do not fit the names
            return None

    def get_parameters(self, config):
        head, _ = self.offer(None)
        return head_arrays(head)

    def fit(self, parameters, config):
        fleet = self.fleet_head(parameters, config)
        head, counts = self.offer(fleet)
        if self.dp_clip > 0:
            head = dp_update(head, fleet, self.dp_clip, self.dp_noise, self.rng)
        counts = {k: int(counts.get(k, 0)) for k in LABEL_KEYS}
        trusted = counts['topic'] + counts['teacher']
        self.offers += 1
        metrics = {'robot': self.robot, 'class_names': encode_names(head.class_names),
                   **{f'labels.{k}': v for k, v in counts.items()}}
        return head_arrays(head), max(trusted, 1), metrics

    def evaluate(self, parameters, config):
        fleet = self.fleet_head(parameters, config)
        if fleet is None:
            return 1.0, 1, {'robot': self.robot, 'accepted': 0, 'error': 'fleet head unreadable'}
        self.fleet_heads.append(fleet)
        out = dict(self.judge(fleet, bool(config.get('final', True)))) if self.judge else {}
        acc = out.get('holdout_acc_fleet')
        n = int(out.pop('n_holdout', 1) or 1)
        metrics = {'robot': self.robot, **{k: v for k, v in out.items()
                                           if isinstance(v, (bool, int, float, str)) and v is not None}}
        metrics['accepted'] = int(bool(out.get('accepted', False)))
        return (1.0 - acc) if acc is not None else 1.0, n, metrics


def run_client(client: FleetClient, server_address: str, root_certificates: bytes | str | None = None,
               max_retries: int | None = 3, max_wait_time: float | None = 30.0,
               log: MessageLog | None = None) -> None:
    """Take part in one session of the fleet server at ``server_address`` (returns when it ends).

    ``root_certificates``: PEM bytes or a path: TLS (the server needs ``--tls-dir``); None: insecure.
    Raises when the server cannot be reached after ``max_retries`` / ``max_wait_time``.
    """
    from flwr.clientapp.client_app import ClientApp
    from flwr.compat.client.app import start_client_internal

    mods = [log] if log is not None else []
    app = ClientApp(client_fn=lambda context: client.to_client(), mods=mods)
    start_client_internal(server_address=server_address, node_config={},
                          load_client_app_fn=lambda *_: app,
                          root_certificates=root_certificates, insecure=root_certificates is None,
                          max_retries=max_retries, max_wait_time=max_wait_time)
