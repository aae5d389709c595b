"""``edge-tl fleet-demo``: a fleet server and several robot processes on loopback, each on its own shift.

The parent starts ``edge-tl fleet-server`` (a process) and one robot process per shift
(``python -m edge_tl_ros.fleet.demo --robot ...``). Each robot takes its own disjoint part of the GTSRB
test set, shifted (night / fog / motion blur by default): a local stream of ``--frames`` frames with
label-topic labels and a held-out test split of ``--test`` frames. It runs the shipped round on its
stream (an accepted head becomes v1 of its own head registry), joins the fleet session (offers its head,
or with ``--local-training`` trains from the fleet head each round), judges the fleet head with its own
gate (holdout + anchor) and registers it if accepted. Then it scores its heads on every robot's held-out
split and writes ``<out>/robot_<shift>.json``; the parent prints the table and writes
``<out>/fleet_demo.json``. No frame crosses a process boundary: each robot reads the data itself.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHIFTS = ('night', 'fog', 'motion_blur')


def _domain(test, k: int, shift: str, severity: int, n_pool: int, n_test: int, engine):
    from ..shifts import apply_shift

    perm = np.random.default_rng(0).permutation(len(test))
    ix = perm[k * (n_pool + n_test):(k + 1) * (n_pool + n_test)]
    if len(ix) < n_pool + n_test:
        raise SystemExit(f'not enough GTSRB test frames for robot {k}')
    feats = engine.features_batch(apply_shift(test.images[ix], shift, severity, seed=1 + k))
    y = test.labels[ix].astype(np.int64)
    return feats[:n_pool], y[:n_pool], feats[n_pool:], y[n_pool:]


def robot(args) -> int:
    """One robot process (see the module docstring)."""
    from ..adapt import AdaptConfig, run_round
    from ..bundle import HeadRegistry, load_bundle, resolve_bundle_path
    from ..data import load_gtsrb_npz
    from ..engine import Engine
    from .client import FleetClient, run_client
    from .gate import fit_to, gate_fleet_head
    from .local import local_step

    bundle = load_bundle(resolve_bundle_path(args.bundle))
    test = load_gtsrb_npz(args.data)[1]
    eng = Engine(bundle, 'feature_extractor', num_threads=1)
    shifts = args.shifts.split(',')
    k = shifts.index(args.robot)
    domains = [_domain(test, j, s, args.severity, args.frames, args.test, eng) for j, s in enumerate(shifts)]
    pool_f, pool_y, _, _ = domains[k]
    names = [bundle.class_names[i] for i in pool_y]
    data = (pool_f, names, ['topic'] * len(names))
    cfg = AdaptConfig(label_sources=('topic',))
    reg = HeadRegistry(bundle, Path(args.out) / f'robot_{args.robot}' / 'state')
    r = run_round(bundle, data, bundle.head, cfg)
    local = reg.add(r.head, {'reason': r.reason}) if r.accepted else bundle.head
    decision = {}

    def offer(fleet):
        if args.local_training and fleet is not None:
            return local_step(bundle, data, fit_to(fleet, local), cfg), {'topic': len(names)}
        return local, {'topic': len(names)}

    def judge(fleet, final):
        g = gate_fleet_head(bundle, data, local, fleet, cfg, margin=0.0)
        if final:
            decision['result'] = g
        m = g.metrics
        return {'accepted': g.accepted, 'holdout_acc_fleet': m.get('holdout_acc_new'),
                'holdout_acc_local': m.get('holdout_acc_old'), 'n_holdout': m.get('n_holdout')}

    client = FleetClient(f'robot_{args.robot}', offer, judge)
    run_client(client, f'127.0.0.1:{args.port}', max_retries=30, max_wait_time=300)
    g = decision.get('result')
    after = reg.add(g.head, {**g.metrics, 'reason': g.reason}) if g is not None and g.accepted else local
    fleet = fit_to(client.fleet_heads[-1], bundle.head)

    def scores(head):
        return {s: float(np.mean(np.argmax(head.logits(d[2]), 1) == d[3])) for s, d in zip(shifts, domains)}
    out = {'robot': args.robot, 'local_round': {'accepted': bool(r.accepted), 'reason': r.reason},
           'gate': None if g is None else {'accepted': bool(g.accepted), 'reason': g.reason},
           'registry_version': reg.current_version, 'local': scores(local), 'fleet': scores(fleet),
           'after_gate': scores(after)}
    Path(args.out, f'robot_{args.robot}.json').write_text(json.dumps(out, indent=1))
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run(args) -> int:
    """The parent: server + robot processes, then the table."""
    from ..bundle import load_bundle, resolve_bundle_path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle_dir = str(load_bundle(resolve_bundle_path(args.bundle)).root)
    port = _free_port()
    shifts = args.shifts.split(',')
    py = [sys.executable, '-m']
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    server = subprocess.Popen(py + ['edge_tl_ros.cli', 'fleet-server', '--address', f'127.0.0.1:{port}',
                                    '--min-robots', str(len(shifts)), '--sessions', '1', '--rounds',
                                    str(args.rounds), '--bundle', bundle_dir, '--out', str(out / 'server')],
                              stdout=open(out / 'server.log', 'w'), stderr=subprocess.STDOUT, env=env)
    for _ in range(600):
        with socket.socket() as s:
            if s.connect_ex(('127.0.0.1', port)) == 0:
                break
        if server.poll() is not None:
            raise SystemExit(f'fleet server exited: see {out / "server.log"}')
        time.sleep(0.1)
    common = ['--port', str(port), '--shifts', args.shifts, '--severity', str(args.severity), '--frames',
              str(args.frames), '--test', str(args.test), '--bundle', bundle_dir, '--out', str(out)]
    common += ['--data', args.data] if args.data else []
    common += ['--local-training'] if args.local_training else []
    robots = [subprocess.Popen(py + ['edge_tl_ros.fleet.demo', '--robot', s] + common,
                               stdout=open(out / f'robot_{s}.log', 'w'), stderr=subprocess.STDOUT, env=env)
              for s in shifts]
    print(f'fleet demo: server pid {server.pid} on 127.0.0.1:{port}, robots '
          f'{", ".join(f"{s} (pid {p.pid})" for s, p in zip(shifts, robots))}', flush=True)
    try:
        rcs = [p.wait(timeout=args.timeout) for p in robots]
        server.wait(timeout=60)
    finally:
        for p in (*robots, server):
            if p.poll() is None:
                p.kill()
    if any(rcs) or server.returncode:
        raise SystemExit(f'a robot or the server failed (exit codes {rcs}, {server.returncode}); '
                         f'logs in {out}')
    res = [json.loads((out / f'robot_{s}.json').read_text()) for s in shifts]
    print(f'{"robot":<14}{"round":>7}{"gate":>7}{"own local":>11}{"own after":>11}'
          f'{"mean local":>12}{"mean fleet":>12}{"mean after":>12}')
    for r in res:
        own = r['robot']
        print(f'{own:<14}{"acc" if r["local_round"]["accepted"] else "rej":>7}'
              f'{"acc" if (r["gate"] or {}).get("accepted") else "rej":>7}{r["local"][own]:>11.3f}'
              f'{r["after_gate"][own]:>11.3f}{np.mean(list(r["local"].values())):>12.3f}'
              f'{np.mean(list(r["fleet"].values())):>12.3f}{np.mean(list(r["after_gate"].values())):>12.3f}')
    summary = {'split': 'each robot\'s held-out test split of its own domain', 'shifts': shifts,
               'rounds': args.rounds, 'local_training': bool(args.local_training), 'robots': res}
    (out / 'fleet_demo.json').write_text(json.dumps(summary, indent=1))
    print(f'wrote {out / "fleet_demo.json"} (server log {out / "server"}/fleet_log.jsonl)')
    return 0


def add_arguments(p) -> None:
    p.add_argument('--shifts', default=','.join(SHIFTS), help='one robot per shift (comma-separated)')
    p.add_argument('--severity', type=int, default=4)
    p.add_argument('--frames', type=int, default=300, help='local labelled frames per robot')
    p.add_argument('--test', type=int, default=500, help='held-out frames per robot')
    p.add_argument('--rounds', type=int, default=1)
    p.add_argument('--local-training', action='store_true', help='federated training (fleet.local_training)')
    p.add_argument('--bundle', default='', help='student bundle ("" = gtsrb_student)')
    p.add_argument('--data', default='',
                   help='gtsrb32.npz or its folder (default $EDGE_TL_DATA, ../shared/data)')
    p.add_argument('--out', default='fleet_demo_out')
    p.add_argument('--timeout', type=float, default=900.0, help='seconds the robots may take')


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description='one robot process of edge-tl fleet-demo')
    add_arguments(p)
    p.add_argument('--robot', required=True)
    p.add_argument('--port', type=int, required=True)
    args = p.parse_args(argv)
    args.data = args.data or None
    return robot(args)


if __name__ == '__main__':
    raise SystemExit(main())
