"""``edge-tl fleet-server``: argument parsing only; Flower is imported when the command runs."""

from __future__ import annotations

METHODS = ('mean', 'median', 'trimmed')
DESCRIPTION = (
    'Serve sessions (forever, or --sessions N): each waits for --min-robots robots, runs --rounds Flower '
    'rounds (fit: every robot offers its head; aggregate; evaluate: every robot gets the fleet head and '
    'judges it with its own gate on the last round) and writes the fleet head (fleet_head_s<N>.npz) and '
    'a log line (fleet_log.jsonl) under --out. Only head weights, class names and label counts arrive.')


# -- edge-tl fleet-server --------------------------------------------------------------------------------
def _cmd(args) -> int:
    from ..bundle import load_bundle, resolve_bundle_path
    from .server import FleetServer, FleetStrategy, load_certificates

    reference = load_bundle(resolve_bundle_path(args.bundle)).head if args.bundle else None
    strategy = FleetStrategy(min_robots=args.min_robots, rounds=args.rounds, method=args.method,
                             clip=None if args.clip < 0 else args.clip, trim=args.trim, reference=reference,
                             round_timeout=args.round_timeout or None)
    srv = FleetServer(args.address, strategy, load_certificates(args.tls_dir), args.out)
    print(f'fleet server on {args.address} ({"TLS" if args.tls_dir else "insecure"}), '
          f'{args.min_robots} robots a session, {args.rounds} round(s), {strategy!r}', flush=True)
    srv.serve(args.sessions)
    return 0


def register(sub) -> None:
    p = sub.add_parser('fleet-server', help='Serve a robot fleet: aggregate heads (never frames) with Flower',
                       description=DESCRIPTION)
    p.add_argument('--address', default='0.0.0.0:9092', help='host:port to listen on')
    p.add_argument('--min-robots', type=int, default=2, help='robots a session waits for')
    p.add_argument('--rounds', type=int, default=1, help='Flower rounds per session')
    p.add_argument('--sessions', type=int, default=0, help='sessions to serve (0 = forever)')
    p.add_argument('--method', choices=METHODS, default='mean', help='aggregation')
    p.add_argument('--clip', type=float, default=-1.0,
                   help='L2 bound of a robot\'s update relative to the fleet head (-1 = the median update '
                        'norm, 0 = off)')
    p.add_argument('--trim', type=float, default=0.25, help='trimmed: fraction dropped at each end')
    p.add_argument('--bundle', default='', help='start the fleet head from this bundle\'s head')
    p.add_argument('--round-timeout', type=float, default=0.0, help='seconds per round (0 = none)')
    p.add_argument('--tls-dir', default='',
                   help='directory with ca.crt, server.pem, server.key ("" = insecure)')
    p.add_argument('--out', default='', help='directory for fleet heads and fleet_log.jsonl')
    p.set_defaults(func=_cmd)
    register_demo(sub)


def _demo(args) -> int:
    from .demo import run

    return run(args)


def register_demo(sub) -> None:
    from .demo import add_arguments

    p = sub.add_parser('fleet-demo', help='A fleet server and one robot process per shift on loopback',
                       description='Start edge-tl fleet-server and one robot process per shift (night, fog, '
                                   'motion blur), each adapting on its own frames, joining the fleet and '
                                   'gating the fleet head; print local vs fleet accuracy on every domain.')
    add_arguments(p)
    p.set_defaults(func=_demo)
