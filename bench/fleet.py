"""fleet: robots on different domain shifts share heads over Flower; local heads vs the fleet head.

Protocol (GTSRB official test set, ``edge_tl_ros.shifts.apply_shift``; one seeded permutation split into
disjoint per-robot parts, so no two robots see the same sign image):

- robot r has one shift (night / fog / motion blur = a new camera / colour cast = another new camera,
  severity 4), a local pool of N frames (its collected stream: 500, 200 with ``--quick``) and a held-out
  test split of its own domain (1000 frames, 300 with ``--quick``), never used to train, gate or choose;
- every figure below is an accuracy on those held-out test splits (``split`` in the JSON says so);
- local head: the shipped round (``adapt.run_round``, AdaptConfig defaults, one label source) on the
  robot's pool, deployed if accepted (else the bundle head);
- fleet, ``offer`` (the adaptation node's default with ``fleet.enabled``): one Flower session on
  loopback (``edge_tl_ros.fleet.server.FleetServer`` + one ``FleetClient`` thread per robot over real
  gRPC), every robot offers its deployed head and its trusted label counts; the strategy is the
  shipped one (trusted-label weighted mean, each update clipped to the median update norm);
- fleet, ``federated`` (``fleet.local_training: true``): ``--rounds`` rounds where each robot
  trains the round's recipe (``fleet.local.local_step``: ``train_head`` + anchor replay) from the fleet
  head on its pool (the node's ``fleet.local_training``);
  ``rounds_to_converge`` = first round whose fleet head moves < 2% (relative L2 of the weights) from the
  previous one (None: not within ``--rounds``); ``round_mean_accuracy`` is the mean test accuracy of each
  round's fleet head (reported, never used to stop);
- gate: every robot judges the final fleet head with ``fleet.gate.gate_fleet_head`` (its pool's holdout
  + the bundle's anchor set, margin 0) against its deployed head; ``after_gate`` = what it then runs;
- labels: ``teacher`` (the round's labelling function ``adapt.pseudo_labels`` with models/gtsrb_teacher)
  and ``topic`` (true labels, a label topic);
- bytes: serialised size of every message the client sends (``MessageLog`` at Flower's client
  boundary), per robot per round;
- ``pooled_frames_reference``: the same recipe on every robot's frames together (what shipping frames to
  one place would give; the fleet never does this);
- poisoned: a fifth client offers a sign-flipped, 10x head claiming 2000 trusted labels; the fleet head
  with plain FedAvg (no clipping) vs the shipped robust aggregation vs the coordinate-wise median.

Target (issue #20): mean accuracy over all robots' domains of the fleet head (after each robot's gate, and
before) > that of every robot's local head, and no robot's own-domain accuracy drops after its gate.

    python -m bench.fleet [--quick] [--rounds R] [--student DIR] [--teacher DIR] [--data PATH]
"""

from __future__ import annotations

import socket
import threading
import time

import numpy as np

from bench import common

NAME = 'fleet'
ROBOTS = (('night', 4), ('fog', 4), ('motion_blur', 4), ('colour_cast', 4))
CONVERGED = 0.02  # a round whose fleet head moves less than this (relative L2 of the weights) has converged
SPLIT = 'held-out test split of each robot\'s domain (never trained on, gated on or used to choose)'


def acc(head, feats, labels) -> float:
    return float(np.mean(np.argmax(head.logits(feats), 1) == labels))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def session(bundle, clients, rounds, method='mean', clip=None):
    """One Flower session on loopback: a FleetServer thread, a thread per client; (strategy, logs)."""
    from edge_tl_ros.fleet.client import MessageLog, run_client
    from edge_tl_ros.fleet.server import FleetServer, FleetStrategy

    port = _free_port()
    addr = f'127.0.0.1:{port}'
    strategy = FleetStrategy(min_robots=len(clients), rounds=rounds, method=method, clip=clip,
                             reference=bundle.head, round_timeout=900)
    srv = FleetServer(addr, strategy).start(1)
    for _ in range(600):
        with socket.socket() as s:
            if s.connect_ex(('127.0.0.1', port)) == 0:
                break
        time.sleep(0.05)
    logs = [MessageLog() for _ in clients]
    errors = []

    def go(c, log):
        try:
            run_client(c, addr, max_retries=10, max_wait_time=120, log=log)
        except Exception as e:  # noqa: BLE001 - reported
            errors.append(f'{c.robot}: {e}')
    ts = [threading.Thread(target=go, args=(c, lg)) for c, lg in zip(clients, logs)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    srv.join(60)
    if errors or srv.error:
        raise RuntimeError(f'fleet session failed: {errors} {srv.error}')
    return strategy, logs


def bytes_per_round(log, rounds) -> dict:
    train = [r['bytes'] for r in log.records if r['type'] == 'train']
    ev = [r['bytes'] for r in log.records if r['type'] == 'evaluate']
    return {'fit_reply_bytes': train[0] if train else None, 'evaluate_reply_bytes': ev[0] if ev else None,
            'bytes_per_round': (sum(train) + sum(ev)) / max(rounds, 1)}


def run(args) -> dict:
    t_start = time.monotonic()
    from bench.adaptation import label_indices, load_models
    from edge_tl_ros.adapt import AdaptConfig, pseudo_labels, run_round
    from edge_tl_ros.engine import Engine
    from edge_tl_ros.fleet.client import FleetClient
    from edge_tl_ros.fleet.gate import fit_to, gate_fleet_head
    from edge_tl_ros.fleet.update import Update, aggregate
    from edge_tl_ros.fleet.local import local_step
    from edge_tl_ros.shifts import apply_shift

    test = common.gtsrb_test(args.data)
    cfg = AdaptConfig()
    student, teacher_eng, labeler, s_labeler, teacher_note = load_models(args, len(test.class_names), cfg)
    eng = Engine(student, 'feature_extractor', num_threads=2)
    head0 = student.head
    n_pool, n_test = (200, 300) if args.quick else (500, 1000)
    rounds = args.rounds or (3 if args.quick else 12)
    perm = np.random.default_rng(0).permutation(len(test))
    robots = []
    for k, (shift, sev) in enumerate(ROBOTS):
        ix = perm[k * (n_pool + n_test):(k + 1) * (n_pool + n_test)]
        imgs = apply_shift(test.images[ix], shift, sev, seed=1 + k)
        feats = eng.features_batch(imgs)
        y = test.labels[ix].astype(np.int64)
        rb = {'name': f'{shift}{sev}', 'shift': shift, 'severity': sev,
              'pool_f': feats[:n_pool], 'pool_y': y[:n_pool], 'test_f': feats[n_pool:], 'test_y': y[n_pool:],
              'labels': {'topic': (y[:n_pool], np.ones(n_pool, bool))}}
        if labeler is not None:
            names, _ = pseudo_labels(imgs[:n_pool], labeler, head0, cfg, feats[:n_pool], s_labeler)
            lab, keep = label_indices(names, student)
            rb['labels']['teacher'] = (lab, keep)
            rb['teacher_label_accuracy'] = (float(np.mean(lab[keep] == y[:n_pool][keep])) if keep.any()
                                            else None)
            rb['teacher_kept'] = float(keep.mean())
        robots.append(rb)
        print(f'[{NAME}] robot {rb["name"]}: features + labels ready', flush=True)
    sources = [s for s in ('teacher', 'topic') if s in robots[0]['labels']]

    def matrix(heads):
        """accuracy of each robot's head on every robot's held-out test split."""
        return [[acc(h, r['test_f'], r['test_y']) for r in robots] for h in heads]

    def local_data(rb, src):
        lab, keep = rb['labels'][src]
        return rb['pool_f'][keep], lab[keep], [src] * int(keep.sum())

    out = {'split': SPLIT, 'robots': [{k: rb.get(k) for k in ('name', 'shift', 'severity',
                                                              'teacher_label_accuracy', 'teacher_kept')}
                                      for rb in robots],
           'n_pool': n_pool, 'n_test_per_robot': n_test, 'teacher': teacher_note, 'rounds': rounds,
           'definitions': {
               'split': SPLIT,
               'local': 'the shipped round (run_round, AdaptConfig defaults) on the robot\'s pool; its head '
                        'if accepted, else the bundle head (what the robot runs before the fleet)',
               'offer': 'one Flower session: each robot offers its deployed head '
                        '(fleet.local_training false)',
               'federated': 'R Flower rounds: each robot trains the round recipe from the fleet head '
                            '(fleet.local_training true)',
               'after_gate': 'the head a robot runs after judging the final fleet head with its own gate '
                             '(gate_fleet_head: pool holdout + anchor, margin 0)',
               'mean_all_domains': 'mean accuracy over the 4 robots\' held-out test splits',
               'bytes': 'serialised RecordDict of every message the Flower client sends (MessageLog mod)',
               'rounds_to_converge': f'first round whose fleet head moves < {CONVERGED:.0%} (relative L2)',
               'target': 'fleet head mean_all_domains > every local head\'s, and no robot\'s own-domain '
                         'accuracy lower after its gate than with its local head'},
           'by_labels': {}}
    for src in sources:
        t_src = time.perf_counter()
        local, counts, rounds_info = [], [], []
        for rb in robots:
            lab, keep = rb['labels'][src]
            r = run_round(student, (rb['pool_f'][keep], lab[keep], [src] * int(keep.sum())), head0,
                          AdaptConfig(label_sources=(src,)))
            local.append(r.head if r.accepted else head0)
            counts.append({src: int(keep.sum())})
            rounds_info.append({'accepted': bool(r.accepted), 'reason': r.reason})
        data = [(rb['pool_f'][rb['labels'][src][1]], rb['labels'][src][0][rb['labels'][src][1]],
                 [src] * int(rb['labels'][src][1].sum())) for rb in robots]

        def judge_for(i, decisions):
            def judge(fleet, final):
                g = gate_fleet_head(student, data[i], local[i], fleet, cfg, margin=0.0)
                if final:
                    decisions[i] = g
                return {'accepted': g.accepted, 'holdout_acc_fleet': g.metrics.get('holdout_acc_new'),
                        'n_holdout': g.metrics.get('n_holdout')}
            return judge

        def mode(name, offer_for, n_rounds, extra=None, method='mean', clip=None):
            decisions = [None] * len(robots)
            clients = [FleetClient(rb['name'], offer_for(i), judge_for(i, decisions))
                       for i, rb in enumerate(robots)] + list(extra or [])
            t0 = time.perf_counter()
            strategy, logs = session(student, clients, n_rounds, method, clip)
            secs = time.perf_counter() - t0
            fleet = fit_to(strategy.fleet_head, head0)
            heads_after = [d.head if d is not None and d.accepted else local[i]
                           for i, d in enumerate(decisions)]
            per_round = [fit_to(h, head0) for h in clients[0].fleet_heads]
            moves = []
            for a, b in zip(per_round, per_round[1:]):
                moves.append(float(np.linalg.norm(b.weight - a.weight)
                                   / max(np.linalg.norm(a.weight), 1e-12)))
            conv = next((k + 2 for k, m in enumerate(moves) if m < CONVERGED), None)
            curve = [float(np.mean(matrix([h])[0])) for h in per_round]
            near = next((k + 1 for k, a in enumerate(curve) if a >= curve[-1] - 0.005), None)
            fleet_m = matrix([fleet])[0]
            after_m = matrix(heads_after)
            res = {'mode': name, 'rounds': n_rounds, 'seconds': round(secs, 2),
                   'fleet_head_accuracy': dict(zip([r['name'] for r in robots], fleet_m)),
                   'fleet_head_mean': float(np.mean(fleet_m)),
                   'per_robot': [],
                   'round_mean_accuracy': curve, 'round_relative_change': moves,
                   'rounds_to_converge': conv if n_rounds > 1 else 1,
                   'rounds_to_within_half_point_of_last_round': near if n_rounds > 1 else 1,
                   'bytes': {c.robot: bytes_per_round(lg, n_rounds) for c, lg in zip(clients, logs)},
                   'aggregation': strategy.log[-1].get('aggregation')}
            for i, rb in enumerate(robots):
                d = decisions[i]
                res['per_robot'].append({
                    'robot': rb['name'], 'gate_accepted': bool(d is not None and d.accepted),
                    'gate_reason': None if d is None else d.reason,
                    'own_domain_after_gate': after_m[i][i],
                    'mean_all_domains_after_gate': float(np.mean(after_m[i])),
                    'all_domains_after_gate': dict(zip([r['name'] for r in robots], after_m[i]))})
            res['mean_over_robots_after_gate'] = float(np.mean([np.mean(m) for m in after_m]))
            return res

        loc_m = matrix(local)
        entry = {'local': [{'robot': rb['name'], 'round': rounds_info[i], 'own_domain': loc_m[i][i],
                            'mean_all_domains': float(np.mean(loc_m[i])),
                            'all_domains': dict(zip([r['name'] for r in robots], loc_m[i]))}
                           for i, rb in enumerate(robots)],
                 'bundle_head': {'mean_all_domains': float(np.mean(matrix([head0])[0])),
                                 'all_domains': dict(zip([r['name'] for r in robots], matrix([head0])[0]))}}
        # what sharing frames would give (the privacy-violating reference): one head, the round's recipe,
        # on every robot's labelled pool together
        parts = [local_data(rb, src) for rb in robots]
        pooled = tuple(np.concatenate([p[j] for p in parts]) for j in range(3))
        pm = matrix([local_step(student, pooled, head0, cfg)])[0]
        entry['pooled_frames_reference'] = {'mean_all_domains': float(np.mean(pm)),
                                            'all_domains': dict(zip([r['name'] for r in robots], pm)),
                                            'note': 'frames shared centrally: not what the fleet does'}
        entry['offer'] = mode('offer', lambda i: (lambda fleet: (local[i], counts[i])), 1)

        def federated_offer(i):
            def offer(fleet):
                prior = fit_to(fleet, head0) if fleet is not None else head0
                return local_step(student, local_data(robots[i], src), prior, cfg), counts[i]
            return offer
        entry['federated'] = mode('federated', federated_offer, rounds)

        best_local = max(e['mean_all_domains'] for e in entry['local'])
        target = {}
        for m in ('offer', 'federated'):
            e = entry[m]
            own_ok = all(p['own_domain_after_gate'] >= entry['local'][i]['own_domain'] - 1e-12
                         for i, p in enumerate(e['per_robot']))
            target[m] = {'fleet_head_mean': e['fleet_head_mean'], 'best_local_mean': best_local,
                         'fleet_head_mean_above_every_local': e['fleet_head_mean'] > best_local,
                         'after_gate_every_robot_mean_above_every_local': all(
                             p['mean_all_domains_after_gate'] > best_local for p in e['per_robot']),
                         'no_own_domain_drop_after_gate': own_ok,
                         'own_domain_changes': [p['own_domain_after_gate'] - entry['local'][i]['own_domain']
                                                for i, p in enumerate(e['per_robot'])]}
            target[m]['met'] = bool(target[m]['fleet_head_mean_above_every_local'] and own_ok)
        entry['target'] = target
        entry['seconds'] = round(time.perf_counter() - t_src, 1)
        out['by_labels'][src] = entry
        print(f'[{NAME}] {src}: best local mean {best_local:.3f}, fleet offer '
              f'{entry["offer"]["fleet_head_mean"]:.3f}, federated '
              f'{entry["federated"]["fleet_head_mean"]:.3f}, '
              f'pooled frames {entry["pooled_frames_reference"]["mean_all_domains"]:.3f}', flush=True)

    # -- a poisoned robot: plain FedAvg vs the shipped robust aggregation vs the median ---------------------
    src = sources[0]
    e = out['by_labels'][src]
    local = [None] * len(robots)
    for i, rb in enumerate(robots):
        lab, keep = rb['labels'][src]
        r = run_round(student, (rb['pool_f'][keep], lab[keep], [src] * int(keep.sum())), head0,
                      AdaptConfig(label_sources=(src,)))
        local[i] = r.head if r.accepted else head0
    updates = [Update.from_head(h, {src: int(rb['labels'][src][1].sum())}) for h, rb in zip(local, robots)]
    poison = type(head0)(-10 * head0.weight, -10 * head0.bias, head0.class_names)
    poisoned_client = FleetClient('poisoned', lambda fleet: (poison, {'topic': 2000}))
    pois = {'labels': src, 'poisoned_head': 'sign-flipped bundle head x10, claiming 2000 topic labels'}
    for name, method, clip in (('fedavg_no_clip', 'mean', 0.0),
                               ('shipped_mean_median_norm_clip', 'mean', None), ('median', 'median', 0.0)):
        decisions = [None] * len(robots)
        data = [(rb['pool_f'][rb['labels'][src][1]], rb['labels'][src][0][rb['labels'][src][1]],
                 [src] * int(rb['labels'][src][1].sum())) for rb in robots]

        def poisoned_judge(i, decisions=decisions, data=data):
            def judge(fleet, final):
                g = gate_fleet_head(student, data[i], local[i], fleet, cfg, margin=0.0)
                if final:
                    decisions[i] = g
                return {'accepted': g.accepted}
            return judge
        clients = [FleetClient(rb['name'], (lambda i: lambda fleet: (local[i], {src: int(
            robots[i]['labels'][src][1].sum())}))(i), poisoned_judge(i)) for i, rb in enumerate(robots)]
        strategy, _ = session(student, clients + [poisoned_client], 1, method, clip)
        fleet = fit_to(strategy.fleet_head, head0)
        fm = matrix([fleet])[0]
        after = [d.head if d is not None and d.accepted else local[i] for i, d in enumerate(decisions)]
        am = matrix(after)
        pois[name] = {'fleet_head_mean': float(np.mean(fm)), 'gates_accepted': sum(
            bool(d is not None and d.accepted) for d in decisions),
            'own_domain_after_gate': [am[i][i] for i in range(len(robots))],
            'mean_over_robots_after_gate': float(np.mean([np.mean(m) for m in am]))}
    clean = aggregate(updates, head0, 'mean', None, first_classes=head0.class_names)
    pois['without_poisoned_client_fleet_head_mean'] = float(np.mean(matrix([fit_to(clean, head0)])[0]))
    out['poisoned'] = pois

    rows = []
    for s_, en in out['by_labels'].items():
        for i, loc in enumerate(en['local']):
            rows.append({'labels': s_, 'robot': loc['robot'], 'local_own': loc['own_domain'],
                         'local_mean_all': loc['mean_all_domains'],
                         'offer_after_gate_own': en['offer']['per_robot'][i]['own_domain_after_gate'],
                         'offer_gate': en['offer']['per_robot'][i]['gate_accepted'],
                         'fed_after_gate_own': en['federated']['per_robot'][i]['own_domain_after_gate'],
                         'fed_gate': en['federated']['per_robot'][i]['gate_accepted']})
        rows.append({'labels': s_, 'robot': 'FLEET HEAD mean', 'local_mean_all': None,
                     'offer_after_gate_own': en['offer']['fleet_head_mean'],
                     'fed_after_gate_own': en['federated']['fleet_head_mean']})
    out['target_met'] = {s_: {m: en['target'][m]['met'] for m in ('offer', 'federated')}
                         for s_, en in out['by_labels'].items()}
    _plot(out, args)
    common.report(NAME, out, args, t_start, rows, title=f'{len(robots)} robots, {n_pool} local frames each')
    return out


def _plot(out, args) -> None:
    n = len(out['by_labels'])
    fig, axes = common.subplots(1, n, figsize=(6 * n, 4), squeeze=False)
    for ax, (src, en) in zip(axes[0], out['by_labels'].items()):
        names = [e['robot'] for e in en['local']] + ['mean']
        x = np.arange(len(names))
        local_own = [e['own_domain'] for e in en['local']]
        local_mean = [e['mean_all_domains'] for e in en['local']]
        series = [('local head, own domain', local_own + [np.mean(local_own)]),
                  ('local head, all domains', local_mean + [np.mean(local_mean)])]
        for m in ('offer', 'federated'):
            fh = list(en[m]['fleet_head_accuracy'].values())
            series.append((f'fleet head ({m}), own domain', fh + [en[m]['fleet_head_mean']]))
            ag = [p['own_domain_after_gate'] for p in en[m]['per_robot']]
            series.append((f'after gate ({m}), own domain', ag + [np.mean(ag)]))
        w = 0.8 / len(series)
        for k, (lab, v) in enumerate(series):
            ax.bar(x + (k - len(series) / 2 + 0.5) * w, v, w, label=lab)
        ax.set_xticks(x, names, fontsize=8)
        ax.set_ylim(0.6, 1.0)
        ax.set_title(f'{src} labels (held-out test splits)', fontsize=9)
        ax.set_ylabel('accuracy')
        ax.legend(fontsize=6, loc='lower right')
    common.savefig(fig, NAME, args)


def add_args(p) -> None:
    p.add_argument('--student', default=None,
                   help='student bundle (default --bundle, else models/gtsrb_student)')
    p.add_argument('--rounds', type=int, default=0, help='federated rounds (default 12; 3 with --quick)')
    common.add_teacher_data_args(p)


main = common.entry(NAME, run, __doc__, add_args)


if __name__ == '__main__':
    raise SystemExit(main())
