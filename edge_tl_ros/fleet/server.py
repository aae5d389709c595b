"""The fleet server: a Flower server whose strategy aggregates robots' heads into a fleet head.

``edge-tl fleet-server --address 0.0.0.0:9092 --min-robots 3 [--bundle DIR] [--rounds 1]
[--method mean|median|trimmed] [--clip C] [--tls-dir DIR] [--out DIR]`` serves sessions forever (or
``--sessions N``): each session waits for ``--min-robots`` robots, runs ``--rounds`` Flower rounds (fit:
every robot offers its head; aggregate; evaluate: every robot gets the fleet head and judges it with its
own gate on the last round) and writes the fleet head (``fleet_head_s<N>.npz``) and a log line
(``fleet_log.jsonl``) under ``--out``.

Transport: Flower's gRPC (bidirectional streaming) fleet API, :func:`flwr.server.start_server`'s
pieces (``start_grpc_server`` + ``run_fl``) so that sessions can repeat on one port and tests can run
the server in a thread. The strategy is :class:`FleetStrategy`, a :class:`flwr.server.strategy.FedAvg`
whose ``aggregate_fit`` is :func:`edge_tl_ros.fleet.update.aggregate` (trusted-label weighted mean,
median or trimmed mean, each robot's update clipped relative to the fleet head). Flower is imported only
by this module and :mod:`edge_tl_ros.fleet.client`.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from flwr.common import FitRes, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.server import Server, run_fl
from flwr.server.server_config import ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.superlink.fleet.grpc_bidi.grpc_server import start_grpc_server

from ..bundle import Head
from .update import METHODS, Update, aggregate, arrays_head, decode_names, encode_names, head_arrays

LABEL_KEYS = ('topic', 'teacher', 'self')
MAX_MESSAGE = 64 * 1024 * 1024  # a head of 10k classes x 4096 features is 160 MB; ours are ~50 kB


def update_of(res: FitRes) -> Update:
    """A robot's FitRes -> :class:`Update` (its arrays, class names and label counts)."""
    m = res.metrics
    head = arrays_head(parameters_to_ndarrays(res.parameters), decode_names(str(m.get('class_names', ''))))
    counts = {k: int(m.get(f'labels.{k}', 0)) for k in LABEL_KEYS}
    if not any(counts.values()):
        counts['topic'] = int(res.num_examples)
    return Update.from_head(head, counts)


class FleetStrategy(FedAvg):
    """FedAvg whose aggregation is :func:`aggregate` (robust, class-aligned, trusted-label weighted).

    ``reference``: the head the fleet starts from (the bundle's head; None = the median of the first
    updates). ``self.fleet_head`` is the latest fleet head; ``self.log`` one dict per round.
    """

    def __init__(self, min_robots: int = 2, rounds: int = 1, method: str = 'mean', clip: float | None = None,
                 trim: float = 0.25, reference: Head | None = None, round_timeout: float | None = None):
        if method not in METHODS:
            raise ValueError(f'method must be one of {METHODS}')
        self.method, self.clip, self.trim, self.rounds = method, clip, trim, int(rounds)
        self.reference = reference
        self.fleet_head: Head | None = reference
        self.first_classes = () if reference is None else reference.class_names
        self.log: list[dict] = []
        self.session = 0
        self.round_timeout = round_timeout
        super().__init__(fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=min_robots,
                         min_evaluate_clients=min_robots, min_available_clients=min_robots,
                         on_fit_config_fn=self._config, on_evaluate_config_fn=self._eval_config,
                         initial_parameters=None, accept_failures=True)

    def __repr__(self) -> str:
        return f'FleetStrategy(method={self.method}, clip={self.clip})'

    def _config(self, server_round: int) -> dict[str, Scalar]:
        cfg: dict[str, Scalar] = {'round': server_round, 'session': self.session}
        if self.fleet_head is not None:
            cfg['class_names'] = encode_names(self.fleet_head.class_names)
        return cfg

    def _eval_config(self, server_round: int) -> dict[str, Scalar]:
        cfg = self._config(server_round)
        cfg['final'] = server_round == self.rounds
        return cfg

    def initialize_parameters(self, client_manager):
        self.session += 1
        if self.fleet_head is None:
            return None  # Flower asks one robot for its head; clients train from their own head then
        return ndarrays_to_parameters(head_arrays(self.fleet_head))

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures):
        entry = {'session': self.session, 'round': server_round, 'failures': len(failures),
                 'robots': [str(r.metrics.get('robot', '')) for _, r in results],
                 'bytes_received': [sum(len(t) for t in r.parameters.tensors) for _, r in results]}
        updates, bad = [], []
        for _, res in results:
            try:
                updates.append(update_of(res))
            except (ValueError, TypeError) as e:  # a malformed offer is left out, never fatal
                bad.append(str(e)[:200])
        if not updates:
            entry['error'] = 'no usable updates'
            self.log.append(entry)
            return None, {}
        info: dict = {}
        head = aggregate(updates, self.fleet_head, self.method, self.clip, self.trim, self.first_classes,
                         info=info)
        self.fleet_head = Head(head.weight, head.bias, head.class_names, server_round)
        entry.update(aggregation=info, rejected_offers=bad)
        self.log.append(entry)
        return ndarrays_to_parameters(head_arrays(self.fleet_head)), {'robots': len(updates),
                                                                      'clip': info['clip']}

    def aggregate_evaluate(self, server_round: int, results, failures):
        evals = [{'robot': str(r.metrics.get('robot', '')), 'num_examples': int(r.num_examples),
                  **{k: v for k, v in r.metrics.items() if k != 'robot'}} for _, r in results]
        for e in reversed(self.log):
            if e.get('round') == server_round and e.get('session') == self.session:
                e['evaluate'] = evals
                break
        acc = [(e['num_examples'], e.get('holdout_acc_fleet')) for e in evals
               if e.get('holdout_acc_fleet') is not None]
        n = sum(k for k, _ in acc)
        loss = 1.0 - sum(k * a for k, a in acc) / n if n else None
        return loss, {'accepted': sum(int(e.get('accepted', 0)) for e in evals)}


def load_certificates(tls_dir: str | None):
    """(ca.crt, server.pem, server.key) bytes from a directory (Flower's TLS option), or None."""
    if not tls_dir:
        return None
    d = Path(tls_dir)
    return tuple((d / n).read_bytes() for n in ('ca.crt', 'server.pem', 'server.key'))


class FleetServer:
    """Flower's gRPC server + :class:`FleetStrategy`, sessions in a loop (``serve``) or a thread."""

    def __init__(self, address: str, strategy: FleetStrategy, certificates=None, out_dir: str | None = None):
        self.address, self.strategy, self.out_dir = address, strategy, out_dir
        self.client_manager = SimpleClientManager()
        self.grpc = start_grpc_server(client_manager=self.client_manager, server_address=address,
                                      max_message_length=MAX_MESSAGE, certificates=certificates)
        self.histories = []
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def session(self):
        """One session: wait for the robots, run the strategy's rounds, disconnect them."""
        server = Server(client_manager=self.client_manager, strategy=self.strategy)
        t0 = time.time()
        hist = run_fl(server, ServerConfig(num_rounds=self.strategy.rounds,
                                           round_timeout=self.strategy.round_timeout))
        self.histories.append(hist)
        if self.out_dir and self.strategy.fleet_head is not None:
            out = Path(self.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            self.strategy.fleet_head.save(out / f'fleet_head_s{self.strategy.session}.npz')
            rounds = [e for e in self.strategy.log if e.get('session') == self.strategy.session]
            with open(out / 'fleet_log.jsonl', 'a') as f:
                f.write(json.dumps({'session': self.strategy.session, 'started': t0, 'finished': time.time(),
                                    'rounds': rounds}, default=str) + '\n')
        return hist

    def serve(self, sessions: int = 0) -> None:
        """Run ``sessions`` sessions (0 = forever), then stop the gRPC server."""
        try:
            k = 0
            while sessions <= 0 or k < sessions:
                self.session()
                k += 1
        finally:
            self.stop()

    def start(self, sessions: int = 1) -> 'FleetServer':
        def run():
            try:
                self.serve(sessions)
            except BaseException as e:  # reported by join()
                self.error = e
        self._thread = threading.Thread(target=run, name='fleet_server', daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def stop(self) -> None:
        self.grpc.stop(grace=1)
