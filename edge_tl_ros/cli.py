"""``edge-tl``: the command-line tool (training, export, evaluation, bags, demo, bring-up).

Each group of subcommands lives in its own module that exposes ``register(subparsers)``; the modules
are imported lazily so that ``edge-tl --help`` and the robot-side commands never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module -> one-line description (shown in --help even if the module's dependencies are missing)
COMMAND_MODULES = (
    'edge_tl_ros.training.cli',   # data, download, train-teacher, distill, export, evaluate, train-default
    'edge_tl_ros.bags.cli',       # make-bag, replay, evaluate-bag
    'edge_tl_ros.nodes.bringup',  # up
    'edge_tl_ros.demo',           # demo
    'edge_tl_ros.fleet.cli',      # fleet-server (needs flwr: requirements/fleet.txt)
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='edge-tl', description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest='command', metavar='COMMAND')
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and (e.name == name or name.startswith(e.name + '.')):
                continue  # not written / not installed in this environment
            raise
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, 'func', None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if not _user_error(e):
            raise
        # bad input (a dataset of the wrong layout, a damaged bundle, no GTSDB folder): one clear line
        print(f'edge-tl {args.command}: {e}', file=sys.stderr)
        return 2
    return int(rc or 0)


def _user_error(e: Exception) -> bool:
    from .bundle import BundleError
    from .classmap import ClassMapError
    from .data import DataError
    from .gtsdb import SceneError

    return isinstance(e, (DataError, BundleError, SceneError, ClassMapError))


if __name__ == '__main__':
    sys.exit(main())
