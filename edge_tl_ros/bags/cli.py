"""``edge-tl make-bag | replay | evaluate-bag``: the bag commands (heavy imports inside the functions)."""

from __future__ import annotations

import argparse
import sys


SHIFT_NAMES = 'night, fog, rain, blur, motion_blur, noise, jpeg, colour_cast'  # edge_tl_ros.shifts.SHIFTS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        'make-bag', help='write a rosbag2 of labelled camera frames from a dataset (optionally shifted)',
        description='Write a rosbag2 (sqlite3 or mcap) with sensor_msgs/Image (or CompressedImage) frames '
                    'and a vision_msgs/Classification label per frame (same header stamp), from a dataset '
                    'split; optionally through a synthetic domain shift.')
    p.add_argument('out', help='output bag directory (must not exist unless --overwrite)')
    p.add_argument('--data', default=None, help='dataset: gtsrb32.npz or its folder, other layouts via '
                   'edge_tl_ros.training.datasets (default: $EDGE_TL_DATA or ../shared/data)')
    p.add_argument('--split', choices=('train', 'test'), default='test')
    p.add_argument('--count', type=int, default=300, help='number of frames (default 300)')
    p.add_argument('--order', choices=('random', 'sequential'), default='random',
                   help='random sample of the split (seeded) or its first COUNT frames in order')
    p.add_argument('--fps', type=float, default=30.0)
    p.add_argument('--storage', choices=('sqlite3', 'mcap'), default='sqlite3')
    p.add_argument('--compressed', action='store_true', help='sensor_msgs/CompressedImage (JPEG) frames')
    p.add_argument('--jpeg-quality', type=int, default=90)
    p.add_argument('--encoding', choices=('rgb8', 'bgr8'), default='rgb8', help='raw image encoding')
    p.add_argument('--shift', default=None, metavar='NAME',
                   help=f'domain shift applied to every frame: {SHIFT_NAMES}')
    p.add_argument('--severity', type=int, default=3, choices=range(1, 6), metavar='1..5')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--upscale', type=int, default=64,
                   help='resize frames to this size so they look like camera crops (0 = keep; default 64)')
    p.add_argument('--image-size', type=int, default=32, help='crop size for folder datasets (default 32)')
    p.add_argument('--image-topic', default=None,
                   help='default /camera/image, or /camera/image/compressed with --compressed')
    p.add_argument('--label-topic', default='/labels')
    p.add_argument('--start-stamp', type=float, default=None,
                   help='header stamp of the first frame, seconds since the epoch (default: now)')
    p.add_argument('--class-map', default=None, metavar='FILE',
                   help="YAML/JSON mapping the data's class names (or ids) to the class names of --bundle; "
                        'the bag then carries those names')
    p.add_argument('--bundle', default='gtsrb_student',
                   help='with --class-map: the bundle whose class names the labels map to (default: '
                        '%(default)s)')
    p.add_argument('--overwrite', action='store_true', help='replace an existing bag at OUT')
    p.add_argument('--no-progress', action='store_true')
    p.set_defaults(func=cmd_make_bag)

    p = subparsers.add_parser(
        'replay', help='publish a bag with rclpy at its recorded timing',
        description='Replay a rosbag2 (sqlite3 or mcap) at the recorded timing, publishing the recorded '
                    'CDR bytes. Ctrl-C stops.')
    p.add_argument('bag')
    p.add_argument('--rate', type=float, default=1.0, help='playback speed factor (0 = as fast as possible)')
    p.add_argument('--loop', action='store_true')
    p.add_argument('--remap', action='append', default=[], metavar='FROM:=TO',
                   help='rename a topic, e.g. /camera/image:=/image (repeatable)')
    p.add_argument('--start-offset', type=float, default=0.0, help='seconds into the bag to start at')
    p.add_argument('--clock', action='store_true', help='publish rosgraph_msgs/Clock on /clock (bag time)')
    p.add_argument('--clock-hz', type=float, default=40.0)
    p.add_argument('--topics', nargs='+', default=None, help='bag topics to play (default: all)')
    p.add_argument('--image-qos', choices=('reliable', 'best_effort'), default='reliable',
                   help='image publishers: reliable keep-last 10 (default) or sensor-data best effort')
    p.add_argument('--deserialize', action='store_true',
                   help='deserialise and publish message objects instead of the recorded bytes')
    from ..nodes.bringup import add_fastdds_arg

    add_fastdds_arg(p)
    p.add_argument('--wait-for-subscribers', type=float, default=0.0, metavar='SEC',
                   help='wait up to SEC seconds for a subscriber on every topic before starting')
    p.set_defaults(func=cmd_replay)

    p = subparsers.add_parser(
        'evaluate-bag', help='run a model bundle over a bag in-process and score it against the labels',
        description='Decode every frame as the perception node does, infer with the bundle, compare with '
                    'the label of the same header stamp; accuracy over time, latency, PNG plot.')
    p.add_argument('bag')
    p.add_argument('--bundle', default='gtsrb_student', help='model bundle: a shipped bundle name or a '
                   'directory (default: %(default)s, found wherever edge-tl runs from)')
    p.add_argument('--mode', choices=('full', 'feature_extractor', 'incremental'),
                   default='feature_extractor')
    p.add_argument('--adapt', action='store_true', help='simulate the adaptation node (edge_tl_ros.adapt) on '
                   'the first part of the bag; the rest is held out (--eval-fraction)')
    p.add_argument('--adapt-every', type=int, default=100,
                   help='trainable frames between adaptation rounds (default: %(default)s)')
    p.add_argument('--labels', default='topic,teacher', metavar='SOURCES',
                   help='with --adapt: label sources the simulated node may use, comma-separated from topic '
                        '(the bag\'s label topic), teacher, self (default: %(default)s, as the node)')
    p.add_argument('--teacher-bundle', default='auto',
                   help='with --adapt: teacher for pseudo-labels: auto (the one the student was distilled '
                        'from), a shipped bundle name or a directory, "" = none (default: %(default)s)')
    p.add_argument('--eval-fraction', type=float, default=0.3,
                   help='with --adapt: the last FRACTION of the frames is held out: never adaptation data, '
                        'scored before and after adapting (0 = none; default: %(default)s)')
    p.add_argument('--class-map', default=None, metavar='FILE',
                   help='YAML/JSON mapping the bag\'s label names to the bundle\'s class names')
    p.add_argument('--window', type=int, default=50, help='running-accuracy window (labelled frames)')
    p.add_argument('--image-topic', default=None, help="default: the bag's only image topic")
    p.add_argument('--label-topic', default='/labels')
    p.add_argument('--threads', type=int, default=1, help='ONNX Runtime intra-op threads')
    p.add_argument('--provider', choices=('cpu', 'cuda', 'tensorrt'), default='cpu')
    p.add_argument('--max-frames', type=int, default=None)
    p.add_argument('--plot', default=None, help='PNG path (default: <bag>.eval.png beside the bag)')
    p.add_argument('--no-plot', action='store_true')
    p.add_argument('--json', default=None, help='write the summary as JSON here')
    p.add_argument('--no-progress', action='store_true')
    p.set_defaults(func=cmd_evaluate_bag)


def _fail(msg: str) -> int:
    print(f'edge-tl: error: {msg}', file=sys.stderr)
    return 2


# -- make-bag ------------------------------------------------------------------------------------------------
def load_split(data, split: str, image_size: int = 32):
    """A :class:`edge_tl_ros.data.Split` of any supported dataset (GTSRB npz here, others via training)."""
    from ..data import load_gtsrb_npz

    try:
        from ..training.datasets import load_dataset
    except ImportError:
        load_dataset = None
    if load_dataset is None:
        train, test = load_gtsrb_npz(data)
        return train if split == 'train' else test
    ds = load_dataset(data, image_size=image_size, progress=False)
    if split == 'test':
        if ds.test is None:
            raise ValueError(f'{ds.source}: the dataset has no test split; use --split train')
        return ds.test
    return ds.train


def make_frames(images, size: int):
    """Upscale [N,h,w,3] frames to size x size (bicubic, like a camera crop of a sign); 0 keeps them."""
    import cv2
    import numpy as np

    if not size or images.shape[1:3] == (size, size):
        return images
    interp = cv2.INTER_CUBIC if size > images.shape[1] else cv2.INTER_AREA
    return np.stack([cv2.resize(im, (size, size), interpolation=interp) for im in images])


def cmd_make_bag(args) -> int:
    import numpy as np

    from ..data import DataError
    from ..shifts import apply_shift, check_shift
    from .io import BagError, bag_info, write_bag

    if args.shift:
        try:
            args.shift = check_shift(args.shift, args.severity)
        except ValueError as e:
            return _fail(str(e))
    if args.count <= 0:
        return _fail('--count must be > 0')
    if args.upscale < 0:
        return _fail('--upscale must be >= 0')
    try:
        split = load_split(args.data, args.split, args.image_size)
        if args.class_map:
            from ..bundle import BundleError, load_bundle, resolve_bundle_path
            from ..classmap import load_class_map, remap_split

            try:
                names = load_bundle(resolve_bundle_path(args.bundle)).class_names
            except BundleError as e:
                return _fail(str(e))
            split = remap_split(split, load_class_map(args.class_map, names), names)
    except (DataError, ValueError, OSError) as e:  # ClassMapError is a ValueError
        return _fail(str(e))
    n = min(args.count, len(split))
    if n == 0:
        return _fail(f'the {args.split} split is empty')
    if n < args.count:
        print(f'note: the {args.split} split has only {len(split)} images; writing {n}', file=sys.stderr)
    rng = np.random.default_rng(args.seed)
    idx = rng.choice(len(split), n, replace=False) if args.order == 'random' else np.arange(n)
    frames = make_frames(split.images[idx], args.upscale)
    if args.shift:
        frames = apply_shift(frames, args.shift, args.severity, seed=args.seed)
    names = [split.class_names[int(y)] for y in split.labels[idx]]
    meta = {'source': str(args.data) if args.data else 'default', 'split': args.split, 'order': args.order,
            'shift': args.shift, 'severity': args.severity if args.shift else None, 'seed': args.seed,
            'upscale': args.upscale, 'class_names': list(split.class_names),
            'created_by': 'edge-tl make-bag'}
    start = int(args.start_stamp * 1e9) if args.start_stamp is not None else None
    try:
        out = write_bag(args.out, frames, names, fps=args.fps, storage=args.storage,
                        compressed=args.compressed, image_topic=args.image_topic,
                        label_topic=args.label_topic, start_stamp=start,
                        encoding=args.encoding, jpeg_quality=args.jpeg_quality, metadata=meta,
                        overwrite=args.overwrite, progress=not args.no_progress)
        info = bag_info(out)
    except BagError as e:
        return _fail(str(e))
    topics = ', '.join(f'{t} ({i.msgtype}, {i.count})' for t, i in info.topics.items())
    shift = f', shift {args.shift} severity {args.severity}' if args.shift else ''
    print(f'wrote {out} ({info.storage}): {n} frames {frames.shape[2]}x{frames.shape[1]} at '
          f'{args.fps:g} fps, {info.duration:.2f} s{shift}; topics: {topics}')
    return 0


# -- replay --------------------------------------------------------------------------------------------------
def cmd_replay(args) -> int:
    from .io import BagError

    try:
        from .replay import replay_main

        return replay_main(args)
    except BagError as e:
        return _fail(str(e))


# -- evaluate-bag --------------------------------------------------------------------------------------------
def cmd_evaluate_bag(args) -> int:
    from pathlib import Path

    from ..bundle import BundleError, resolve_bundle_path
    from ..engine import EngineError
    from .evaluate import evaluate_bag, plot_result, write_json
    from .io import BagError

    from ..classmap import ClassMapError

    try:
        bundle_path = resolve_bundle_path(args.bundle)
        class_map = teacher = cfg = None
        if args.class_map:
            from ..bundle import load_bundle
            from ..classmap import load_class_map

            class_map = load_class_map(args.class_map, load_bundle(bundle_path).class_names)
        if args.adapt:
            from ..adapt import AdaptConfig
            from ..bundle import load_bundle, resolve_teacher

            cfg = AdaptConfig(label_sources=tuple(s.strip() for s in args.labels.split(',') if s.strip()))
            try:
                cfg.validate()
            except ValueError as e:
                return _fail(f'--labels {args.labels}: {e}')
            if 'teacher' in cfg.label_sources:
                teacher, how = resolve_teacher(args.teacher_bundle, load_bundle(bundle_path))
                if teacher is not None:
                    load_bundle(teacher)  # a missing or broken teacher is an error here, not a failed round
                print(f'adaptation: labels {",".join(cfg.label_sources)}; {how}')
            if not 0 <= args.eval_fraction < 1:
                return _fail('--eval-fraction must be in [0, 1)')
        res = evaluate_bag(args.bag, bundle_path, mode=args.mode,
                           image_topic=args.image_topic, label_topic=args.label_topic, window=args.window,
                           adapt=args.adapt, adapt_every=args.adapt_every, adapt_config=cfg,
                           num_threads=args.threads, provider=args.provider, max_frames=args.max_frames,
                           progress=not args.no_progress, teacher=teacher,
                           eval_fraction=args.eval_fraction if args.adapt else 0.0, class_map=class_map)
    except (BagError, BundleError, EngineError, ClassMapError) as e:
        return _fail(str(e))
    print(res.text())
    if not args.no_plot:
        bag = Path(args.bag).expanduser()
        out = Path(args.plot) if args.plot else bag.parent / (bag.name.rstrip('/') + '.eval.png')
        print(f'plot: {plot_result(res, out)}')
    if args.json:
        print(f'json: {write_json(res, args.json)}')
    return 0


def main(argv=None) -> int:  # python -m edge_tl_ros.bags.cli ...
    parser = argparse.ArgumentParser(prog='edge-tl')
    register(parser.add_subparsers(dest='command'))
    args = parser.parse_args(argv)
    if not getattr(args, 'func', None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == '__main__':
    sys.exit(main())
