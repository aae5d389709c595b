"""Shared plumbing of the benchmarks: results files, machine description, bundles, ROS processes.

Every benchmark module has ``run(args) -> dict`` and ``main()`` (from :func:`entry`: the same flags for
each, ``--quick``, ``--results-dir``, ``--bundle``, from :func:`add_common_args`; ``run`` raises
:class:`Skip` where models or data are absent). Results are written with :func:`write_result` (or
:func:`report`: write, print the table, say where) to ``<results-dir>/<name>.json`` (``bench/results``
for full runs, ``bench/results/quick`` for ``--quick``).

The node benchmarks run three processes on one ROS domain of their own (``ros_env``): the node under
test (:mod:`bench.node_runner`, arguments from :func:`node_args` / :func:`perception_params`), a frame
publisher and a receiver (:mod:`bench.traffic`; :func:`stream_session`). Header stamps and receipt times
are wall-clock (``time.time()``) on the same machine, so they share one clock. The benchmarks that start
the shipped nodes themselves (``soak``, ``adaptation_memory``) drive them from a :class:`Driver` node.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / 'bench' / 'results'
STUDENT = REPO / 'models' / 'gtsrb_student'
TEACHER = REPO / 'models' / 'gtsrb_teacher'


# -- results -------------------------------------------------------------------------------------------
def add_common_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument('--quick', action='store_true', help='short run: checks the code works, not speed')
    p.add_argument('--results-dir', default=None, help='where <name>.json/.png go (default bench/results, '
                   'or bench/results/quick with --quick)')
    p.add_argument('--bundle', default=None, help='student bundle (default: models/gtsrb_student if valid, '
                   'else a generated toy bundle)')
    return p


def add_teacher_data_args(p: argparse.ArgumentParser) -> None:
    """``--teacher`` (default models/gtsrb_teacher) and ``--data`` of the benchmarks that evaluate models."""
    p.add_argument('--teacher', default=str(TEACHER))
    p.add_argument('--data', default=None,
                   help='gtsrb32.npz or its folder (default $EDGE_TL_DATA / ../shared/data)')


def bench_parser(doc: str | None, add_args=None) -> argparse.ArgumentParser:
    """The common flags, then the benchmark's own (``add_args(parser)``)."""
    p = add_common_args(argparse.ArgumentParser(description=doc,
                                                formatter_class=argparse.RawDescriptionHelpFormatter))
    if add_args is not None:
        add_args(p)
    return p


class Skip(Exception):
    """Raised by a benchmark's ``run()`` when its models or data are absent: :func:`entry` writes
    ``{"skipped": reason}``."""


def entry(name: str, run, doc: str | None, add_args=None, ok=None):
    """A benchmark's ``main(argv=None)``: parse, ``run(args)`` (a :class:`Skip` it raises writes the
    skipped result); exit status 1 where ``ok(result)`` says no."""
    def main(argv=None) -> int:
        args = bench_parser(doc, add_args).parse_args(argv)
        t_start = time.monotonic()
        try:
            data = run(args)
        except Skip as e:
            print(f'[{name}] skipped: {e}')
            data = {'skipped': str(e)}
            write_result(name, data, args, t_start)
        return 0 if ok is None or ok(data) else 1

    return main


def add_qos_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument('--qos', choices=('best_effort', 'reliable'), default='best_effort',
                   help="student node's qos_reliability (the publisher is reliable, depth 10)")


def add_dds_arg(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument('--dds', choices=tuple(DDS_PROFILES), default='large_shm', help=help)


def stop_on_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt, so ``run()``'s finally stops the processes it started."""
    def _term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)


def results_dir(args) -> Path:
    if getattr(args, 'results_dir', None):
        d = Path(args.results_dir)
    else:
        d = RESULTS / 'quick' if args.quick else RESULTS
    d.mkdir(parents=True, exist_ok=True)
    return d


def _cpu_model() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.lower().startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


def machine_info() -> dict:
    info = {'cores': os.cpu_count(), 'cores_usable': len(os.sched_getaffinity(0)), 'cpu_model': _cpu_model(),
            'python': platform.python_version(), 'platform': platform.platform(),
            'load_avg_1m': os.getloadavg()[0]}
    try:
        import onnxruntime

        info['onnxruntime'] = onnxruntime.__version__
    except ImportError:
        info['onnxruntime'] = None
    return info


def _clean(o):
    """JSON-safe: numpy scalars/arrays -> Python, NaN/Inf -> None."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, np.ndarray):
        return _clean(o.tolist())
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return f if math.isfinite(f) else None
    if isinstance(o, Path):
        return str(o)
    return o


def write_result(name: str, data: dict, args, t_start: float | None = None, module: str | None = None
                 ) -> Path:
    argv = [Path(sys.executable).name, '-m', f'bench.{module or name}'] + sys.argv[1:]
    out = {'name': name, 'quick': bool(args.quick),
           'timestamp': _dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds'),
           'command': ' '.join(shlex.quote(a) for a in argv) if sys.argv and sys.argv[0] else None,
           'machine': machine_info()}
    if t_start is not None:
        out['duration_s'] = round(time.monotonic() - t_start, 1)
    out.update(data)
    return write_json(results_dir(args) / f'{name}.json', _clean(out), indent=2)


def write_json(path, obj, indent: int | None = None) -> Path:
    """``obj`` as JSON to ``path``, atomically (a ``.tmp`` file beside it, then renamed)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + '.tmp')
    tmp.write_text(json.dumps(obj, indent=indent) + '\n')
    os.replace(tmp, path)
    return path


def pct(x, q) -> float:
    x = np.asarray(x, np.float64)
    return float(np.percentile(x, q)) if x.size else float('nan')


def lat_summary(ms) -> dict:
    ms = np.asarray(ms, np.float64)
    if not ms.size:
        return {'n': 0, 'p50_ms': None, 'p90_ms': None, 'p99_ms': None, 'max_ms': None, 'mean_ms': None}
    return {'n': int(ms.size), 'p50_ms': pct(ms, 50), 'p90_ms': pct(ms, 90), 'p99_ms': pct(ms, 99),
            'max_ms': float(ms.max()), 'mean_ms': float(ms.mean())}


def report(name: str, data: dict, args, t_start: float, rows: list[dict], cols: list[str] | None = None,
           title: str | None = None) -> Path:
    """:func:`write_result`, then the table of ``rows`` (title: the name, cores, ``title``), then where."""
    path = write_result(name, data, args, t_start)
    print_table(rows, cols, title=f'{name} ({machine_info()["cores"]} cores; {title})')
    print(f'[{name}] wrote {path}')
    return path


def print_table(rows: list[dict], cols: list[str] | None = None, title: str | None = None) -> str:
    """``rows`` as a text table; ``cols`` (default: the keys of the rows, in order) pick the columns."""
    cols = cols or list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v):
        if isinstance(v, float):
            return f'{v:.3g}' if abs(v) < 1000 else f'{v:.0f}'
        return '-' if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ([title] if title else []) + ['  '.join(v.ljust(w) for v, w in zip(row, widths))
                                          for row in [cols, ['-' * w for w in widths], *cells]]
    text = '\n'.join(lines)
    print(text, flush=True)
    return text


def savefig(fig, name: str, args) -> Path:
    path = results_dir(args) / f'{name}.png'
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt().close(fig)
    return path


def plot_cdf(ax, x, label: str) -> None:
    """The empirical CDF of ``x`` on ``ax`` (nothing where ``x`` is empty)."""
    if len(x):
        xs = np.sort(x)
        ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=label)


def plt():
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as _plt

    return _plt


def subplots(*args, **kwargs):
    """``plt.subplots`` on the Agg backend: (figure, axes)."""
    return plt().subplots(*args, **kwargs)


# -- bundles -------------------------------------------------------------------------------------------
def tmp_root() -> Path:
    d = RESULTS / 'tmp'  # gitignored scratch
    d.mkdir(parents=True, exist_ok=True)
    return d


def resolve_bundle(arg: str | None) -> tuple[Path, dict]:
    """The student bundle: ``arg``, else models/gtsrb_student if it loads, else a toy bundle at 32x32."""
    from edge_tl_ros.bundle import BundleError, load_bundle

    note = None
    if arg:
        path = Path(arg)
    else:
        path = None
        if STUDENT.is_dir():
            try:
                load_bundle(STUDENT)
                path = STUDENT
            except BundleError as e:
                note = f'models/gtsrb_student present but not loadable ({e}); using the toy bundle'
        if path is None:
            from edge_tl_ros.toy import make_toy_bundle

            path = tmp_root() / f'toy32_{os.getpid()}'
            make_toy_bundle(path, size=32, name='toy32')
            note = note or 'models/gtsrb_student absent: toy bundle (mean-colour ONNX backbone), 32x32'
    b = load_bundle(path)
    arch = b.manifest.get('architecture')
    info = {'path': str(path), 'name': b.name, 'input_size': list(b.input_size),
            'feature_size': b.feature_size, 'num_classes': len(b.class_names),
            'is_toy': arch == 'toy_mean_colour', 'architecture': arch}
    if note:
        info['note'] = note
    return path, info


def gtsrb_test(data: str | None):
    """The GTSRB official test set (``data``: the ``--data`` flag); :class:`Skip` where it is absent."""
    from edge_tl_ros.data import load_gtsrb_npz

    try:
        return load_gtsrb_npz(data)[1]
    except (FileNotFoundError, OSError) as e:
        raise Skip(f'GTSRB data absent: {e}') from e


def fill_store(root, bundle, images, labels=None) -> None:
    """A FrameStore at ``root`` of ``images`` with the bundle's features and probabilities; ``labels``
    (class indices) as ``topic`` labels, or None: unlabelled (a round labels them)."""
    from edge_tl_ros.engine import Engine
    from edge_tl_ros.store import FrameStore

    eng = Engine(bundle, 'feature_extractor', num_threads=2)
    feats, probs = eng.features_batch(images), eng.predict_batch(images)
    store = FrameStore(root, max_entries=max(2000, len(images)))
    for i in range(len(images)):
        lab = None if labels is None else bundle.class_names[int(labels[i])]
        store.add(1_000_000 + i, images[i], feats[i], probs[i], label=lab,
                  source='' if labels is None else 'topic')


def teacher_info() -> dict | None:
    """Manifest facts of models/gtsrb_teacher (None if absent)."""
    if not (TEACHER / 'manifest.yaml').is_file():
        return None
    import yaml

    return yaml.safe_load((TEACHER / 'manifest.yaml').read_text())


# -- ROS processes -------------------------------------------------------------------------------------
DDS_PROFILES = {'default': None, 'large_shm': REPO / 'config' / 'fastdds_large_shm.xml'}
ROS_ENV_KEYS = ('RMW_IMPLEMENTATION', 'ROS_AUTOMATIC_DISCOVERY_RANGE', 'ROS_LOCALHOST_ONLY', 'ROS_DOMAIN_ID',
                'FASTDDS_DEFAULT_PROFILES_FILE', 'FASTRTPS_DEFAULT_PROFILES_FILE')


def ros_env(domain: int | None = None, dds: str = 'default') -> dict:
    """Environment for benchmark processes: Fast DDS, localhost only, a domain of this run's own.

    ``dds='large_shm'`` loads config/fastdds_large_shm.xml (16 MiB shared-memory segment) in every process.
    """
    env = dict(os.environ)
    env.setdefault('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp')
    if 'ROS_LOCALHOST_ONLY' not in env:
        env.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    # tests use 1..100; benchmarks 120..219, spread by pid so concurrent runs do not see each other
    env['ROS_DOMAIN_ID'] = str(domain if domain is not None else 120 + (os.getpid() * 7) % 100)
    env['PYTHONUNBUFFERED'] = '1'
    if DDS_PROFILES[dds] is not None:
        env['FASTDDS_DEFAULT_PROFILES_FILE'] = env['FASTRTPS_DEFAULT_PROFILES_FILE'] = str(DDS_PROFILES[dds])
    env['PYTHONPATH'] = str(REPO) + (os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
    return env


def adopt_ros_env(env: dict) -> None:
    """This process joins the ROS set-up of ``env`` (middleware, discovery, domain, DDS profile)."""
    for k in ROS_ENV_KEYS:
        if k in env:
            os.environ[k] = env[k]


def ros_params(params: dict) -> list[str]:
    """``{name: value}`` -> ``['-p', 'name:=value', ...]`` (the values as ``str`` writes them)."""
    return [a for k, v in params.items() for a in ('-p', f'{k}:={v}')]


def node_args(kind: str, params: dict | None = None, *flags: str) -> list[str]:
    """Arguments of :mod:`bench.node_runner`: ``--kind``, its own ``flags``, then the node's parameters."""
    return ['--kind', kind, *flags, *(['--ros-args', *ros_params(params)] if params is not None else [])]


def perception_params(bundle, state_dir, qos: str) -> dict:
    """The perception node's parameters in every node benchmark (each adds its own to the dict)."""
    return {'model_bundle': bundle, 'state_dir': state_dir, 'qos_reliability': qos,
            'diagnostics_period_s': 0.5}


_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent():  # in the child before exec: SIGKILL when this process dies (even by SIGKILL)
    _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Proc:
    """A benchmark subprocess; ``stop()`` sends SIGINT (the process writes its log) and waits.

    ``die_with_parent``: the child is killed when this process dies (a killed benchmark leaves no node).
    """

    def __init__(self, argv: list[str], env: dict, log_path: Path, name: str, die_with_parent: bool = False):
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, 'w')
        self.p = subprocess.Popen([sys.executable, *argv], env=env, cwd=str(REPO), stdout=self._log,
                                  stderr=subprocess.STDOUT, start_new_session=True,
                                  preexec_fn=_die_with_parent if die_with_parent else None)

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def check(self, what: str = 'exited early', lines: int = 30) -> None:
        """Raise (with the log's tail) if the process has ended."""
        if not self.alive():
            raise RuntimeError(f'{self.name} {what} (rc {self.p.returncode}):\n{self.tail(lines)}')

    def wait(self, timeout: float) -> int | None:
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 10.0) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)
            if self.wait(timeout) is None:
                self.p.kill()
                self.p.wait(5)
        self._log.close()
        return self.p.returncode

    def tail(self, n: int = 30) -> str:
        try:
            return '\n'.join(Path(self.log_path).read_text(errors='replace').splitlines()[-n:])
        except OSError:
            return ''


def wait_until(ready, timeout: float, procs=(), poll_s: float = 0.05, what: str = 'exited early') -> bool:
    """Poll ``ready()`` until it is true (True) or ``timeout`` s pass (False); raise if a process ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return True
        for pr in procs:
            pr.check(what)
        time.sleep(poll_s)
    return False


class ProcMonitor:
    """Samples CPU time and memory of a process every ``period`` s in a thread.

    ``samples``: (wall time, cpu seconds, RSS MB, RssAnon MB, RssShmem MB[, open fds with ``fds``]).
    RssAnon (heap, stacks) is what a leak grows; RssShmem counts the DDS shared-memory segments' pages as
    the process touches them.
    """

    def __init__(self, pid: int, period: float = 0.5, fds: bool = False):
        import psutil

        self.proc = psutil.Process(pid)
        self.period = period
        self.fds = fds
        self.samples: list[tuple] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _sample(self):
        try:
            ct = self.proc.cpu_times()
            rss = self.proc.memory_info().rss / 2**20
            fds = (self.proc.num_fds(),) if self.fds else ()
        except Exception:  # process gone
            return
        anon = shm = float('nan')
        try:
            for line in open(f'/proc/{self.proc.pid}/status'):
                if line.startswith('RssAnon:'):
                    anon = int(line.split()[1]) / 1024
                elif line.startswith('RssShmem:'):
                    shm = int(line.split()[1]) / 1024
        except OSError:
            pass
        self.samples.append((time.time(), ct.user + ct.system, rss, anon, shm, *fds))

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.period)

    def stop(self, last_sample: bool = True):
        if last_sample:
            self._sample()
        self._stop.set()
        self._t.join(2)

    def cpu_percent(self, t0: float, t1: float) -> float:
        """Mean CPU% (100 = one core) of the process between wall times t0 and t1."""
        s = [x for x in self.samples if t0 <= x[0] <= t1]
        if len(s) < 2:
            return float('nan')
        return 100.0 * (s[-1][1] - s[0][1]) / max(1e-9, s[-1][0] - s[0][0])

    def rss_at(self, t: float) -> float:
        s = [x for x in self.samples if x[0] <= t] or self.samples[:1]
        return s[-1][2] if s else float('nan')


def first_last(x, k: int) -> tuple[float, float]:
    """Medians of the first and the last ``k`` values of ``x`` (NaN, NaN when it is empty)."""
    x = np.asarray(x, np.float64)
    return (float(np.median(x[:k])), float(np.median(x[-k:]))) if len(x) else (float('nan'),) * 2


def slope_per_min(t, y) -> float | None:
    """Least-squares slope of ``y`` per minute of ``t`` (seconds); None under 4 points."""
    return float(np.polyfit((np.asarray(t) - t[0]) / 60.0, y, 1)[0]) if len(t) > 3 else None


def cleanup(workdir: Path) -> None:
    """Remove a benchmark's scratch directory (kept with BENCH_KEEP=1)."""
    if not os.environ.get('BENCH_KEEP'):
        shutil.rmtree(workdir, ignore_errors=True)


def new_workdir(name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f'{name}_', dir=tmp_root()))


PERCEPTION_RECV = {'cls_topic': '/perception/classification', 'node_name': 'perception'}


def stream_session(workdir: Path, node_argv: list[str], rate: float, seconds: float, width: int = 640,
                   height: int = 480, recv_cfg: dict | None = None, dds: str = 'default',
                   settle_s: float = 1.2, timeout_s: float = 600) -> dict:
    """Node under test + receiver + publisher; returns the merged logs and process statistics.

    ``node_argv``: arguments of :mod:`bench.node_runner` (``--stats-out`` is added). The publisher
    (:mod:`bench.traffic` role ``pub``) sends ``bgr8`` frames (:func:`frames_for`) at ``rate`` Hz for
    ``seconds`` s, reliable depth 10; ``recv_cfg``: the config of the ``recv`` role (file paths are
    added; default: the perception node's classification topic).
    """
    env = ros_env(dds=dds)
    stats_path = workdir / 'node_stats.json'
    ready = workdir / 'node.ready'
    np.save(workdir / 'frames.npy', frames_for(width, height))
    pub_cfg = {'frames_npy': str(workdir / 'frames.npy'), 'rate_hz': rate, 'duration_s': seconds,
               'qos': 'reliable', 'depth': 10}

    def traffic(role: str, cfg: dict) -> Proc:
        (workdir / f'{role}_cfg.json').write_text(json.dumps(dict(cfg, role=role)))
        return Proc(['-m', 'bench.traffic', str(workdir / f'{role}_cfg.json')], env, workdir / f'{role}.log',
                    role)

    node = Proc(['-m', 'bench.node_runner', '--stats-out', str(stats_path), '--ready-file', str(ready),
                 *node_argv], env, workdir / 'node.log', 'node')
    procs = [node]
    try:
        # the receiver starts alongside the node (it waits for the classification publisher itself)
        recv = traffic('recv', dict(recv_cfg or PERCEPTION_RECV, out=str(workdir / 'recv.json'),
                                    ready=str(workdir / 'recv.ready')))
        procs.append(recv)
        if not wait_until(ready.exists, 120, procs):
            raise RuntimeError(f'node did not start in 120 s:\n{node.tail()}')
        mon = ProcMonitor(node.pid)
        if not wait_until((workdir / 'recv.ready').exists, 60, procs):
            raise RuntimeError(f'receiver not ready in 60 s:\n{recv.tail()}')
        pub = traffic('pub', dict(pub_cfg, out=str(workdir / 'pub.json')))
        procs.append(pub)
        rc = pub.wait(timeout_s)
        if rc is None:
            raise RuntimeError(f'publisher still running after {timeout_s} s:\n{pub.tail()}')
        if rc != 0:
            raise RuntimeError(f'publisher failed (rc {rc}):\n{pub.tail()}')
        time.sleep(settle_s)  # last classifications and one more /diagnostics
        recv.stop()
        mon.stop()
        node_rc = node.stop()
        pub.stop()
        res = {'workdir': str(workdir), 'pub': json.loads((workdir / 'pub.json').read_text()),
               'recv': json.loads((workdir / 'recv.json').read_text()),
               'node': json.loads(stats_path.read_text()) if stats_path.exists() else {}, 'node_rc': node_rc,
               'monitor': mon}
        cleanup(workdir)  # logs stay only when something failed (or BENCH_KEEP=1)
        return res
    finally:
        for pr in reversed(procs):
            if pr.alive():
                pr.stop()


# -- publishing frames ---------------------------------------------------------------------------------
class Pacer:
    """Ticks at ``rate`` Hz; a tick more than one period late restarts the schedule (no burst to catch up,
    counted in ``resets``)."""

    def __init__(self, rate: float):
        self.period = 1.0 / rate
        self.t_next = time.perf_counter()
        self.resets = 0

    def wait(self) -> None:
        now = time.perf_counter()
        if self.t_next > now:
            time.sleep(self.t_next - now)
        elif now - self.t_next > self.period:
            self.resets += 1
            self.t_next = now
        self.t_next += self.period


def stamp(header, seq: int) -> float:
    """Header stamp = wall time now, ``frame_id`` = the sequence number; returns the stamp in seconds."""
    t = time.time()
    header.stamp.sec, header.stamp.nanosec = int(t), int((t % 1) * 1e9)
    header.frame_id = str(seq)
    return header.stamp.sec + header.stamp.nanosec * 1e-9


class Driver:
    """The benchmark's own rclpy node on a context of its own, spun in a thread: publishes ``image``
    (reliable, ``image_depth``) and ``labels`` (reliable, depth 100), records ``/adaptation/status``
    (latched) as ``statuses``: (wall time of receipt, status dict)."""

    def __init__(self, name: str, domain: int, image_depth: int, threads: int = 1):
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from rclpy.signals import SignalHandlerOptions
        from sensor_msgs.msg import Image
        from std_msgs.msg import String
        from vision_msgs.msg import Classification

        self.ctx = Context()
        # Ctrl-C / SIGTERM must reach run()'s finally (which stops the node processes), not only rclpy
        rclpy.init(context=self.ctx, domain_id=domain, signal_handler_options=SignalHandlerOptions.NO)
        self.node = rclpy.create_node(name, context=self.ctx)
        rel = ReliabilityPolicy.RELIABLE
        self.pub = self.node.create_publisher(Image, 'image', QoSProfile(depth=image_depth, reliability=rel))
        self.pub_lab = self.node.create_publisher(Classification, 'labels',
                                                  QoSProfile(depth=100, reliability=rel))
        self.statuses: list[tuple[float, dict]] = []
        self._lock = threading.Lock()
        latched = QoSProfile(depth=1, reliability=rel, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.node.create_subscription(String, '/adaptation/status', self._on_status, latched)
        self.ex = (SingleThreadedExecutor(context=self.ctx) if threads == 1
                   else MultiThreadedExecutor(num_threads=threads, context=self.ctx))
        self.ex.add_node(self.node)

    def start(self) -> None:
        """Spin (after the subclass made its subscriptions)."""
        threading.Thread(target=self._spin_loop, daemon=True).start()

    def _spin_loop(self):
        try:
            self.ex.spin()
        except Exception:  # context shut down
            pass

    def _on_status(self, msg):
        try:
            d = json.loads(msg.data)
        except ValueError:
            return
        with self._lock:
            self.statuses.append((time.time(), d))

    @property
    def status(self) -> dict:
        """The latest status ({} before the first)."""
        with self._lock:
            return self.statuses[-1][1] if self.statuses else {}

    def status_of(self, pid: int) -> list[tuple[float, dict]]:
        with self._lock:
            return [(t, d) for t, d in self.statuses if d.get('pid') == pid]

    def image_messages(self, frames: np.ndarray, encoding: str = 'bgr8') -> list:
        """``sensor_msgs/Image`` of BGR ``frames`` in ``encoding`` (``bgr8`` or ``rgb8``)."""
        from sensor_msgs.msg import Image

        from edge_tl_ros.imaging import image_fields

        return [Image(**image_fields(f[..., ::-1] if encoding == 'rgb8' else f, encoding)) for f in frames]

    def label(self, class_name: str, header):
        """A label for the frame of ``header``: its stamp and frame_id, one class with score 1."""
        from vision_msgs.msg import Classification, ObjectHypothesis

        lab = Classification(results=[ObjectHypothesis(class_id=class_name, score=1.0)])
        lab.header.stamp, lab.header.frame_id = header.stamp, header.frame_id
        return lab

    def wait_ready(self, ready, procs, timeout: float) -> None:
        """Until ``ready()`` (then 0.5 s more: discovery settles on the nodes' side too)."""
        if not wait_until(ready, timeout, procs, poll_s=0.1, what='exited during start-up'):
            raise RuntimeError(f'nodes not ready after {timeout:.0f} s:\n'
                               + '\n'.join(p.tail(15) for p in procs))
        time.sleep(0.5)

    def close(self):
        try:
            self.ex.shutdown(timeout_sec=2)
            self.node.destroy_node()
        finally:
            self.ctx.try_shutdown()


def frames_for(width: int, height: int, n: int = 4, seed: int = 0, labels: bool = False):
    """``n`` BGR frames: GTSRB test signs scaled up when the data is there, else textured noise.

    ``labels``: (frames, their class indices); without the data that raises LookupError (labels of noise
    would be meaningless)."""
    import cv2

    rng = np.random.default_rng(seed)
    try:
        from edge_tl_ros.data import find_gtsrb_npz

        with np.load(find_gtsrb_npz(), allow_pickle=False) as z:
            x = z['X_test']  # only the arrays needed are read
            y = z['y_test'] if labels else None
        idx = rng.choice(len(x), n, replace=False)
        small = x[idx][..., ::-1]
    except Exception as e:  # no data: noise is as good for timing
        if labels:
            raise LookupError(f'no labelled frames: {e}') from e
        small = rng.integers(0, 256, (n, 24, 32, 3), dtype=np.uint8)
    frames = np.stack([cv2.resize(im, (width, height), interpolation=cv2.INTER_LINEAR) for im in small])
    return (frames, y[idx]) if labels else frames


def session_summary(res: dict, warmup_s: float) -> tuple[dict, dict]:
    """The numbers every node benchmark reports for one session (see ``definitions`` in the JSONs), and
    per classified frame: seq, publish stamp, receipt time, latency, measured (published after the
    warm-up), with the publish stamps of all frames and the measured window."""
    pub, recv, node = res['pub'], res['recv'], res['node']
    stamps = np.asarray(pub['stamp'], np.float64)
    seqs_r = np.asarray(recv['seq'], np.int64)
    t_recv = np.asarray(recv['t'], np.float64)
    ok = (seqs_r >= 0) & (seqs_r < len(stamps))
    seqs_r, t_recv = seqs_r[ok], t_recv[ok]
    t0 = stamps[0] + warmup_s if len(stamps) else 0.0
    t1 = float(stamps[-1]) if len(stamps) else 0.0
    j = {'stamps': stamps, 'seq': seqs_r, 't_recv': t_recv, 'lat_ms': (t_recv - stamps[seqs_r]) * 1e3,
         'measured': stamps[seqs_r] >= t0, 't_measure_start': t0, 't_measure_end': t1}
    m = j['measured']
    lat = j['lat_ms'][m]
    n_out = int(m.sum())
    diag = recv.get('diag_last') or {}
    infers = np.asarray([d for t, d in node.get('infers', []) if t0 <= t <= t1], np.float64)
    mon = res['monitor']
    # decomposition from the node's per-frame records: stamp -> taken by the inference thread -> done
    fr = [f for f in node.get('frames', []) if t0 <= f[1] <= t1]
    to_node = np.asarray([f[2] - f[1] for f in fr]) * 1e3
    proc = np.asarray([f[3] for f in fr], np.float64)
    return {
        'published': len(j['stamps']), 'input_rate_hz': pub.get('achieved_rate_hz'),
        'classified': int(len(j['seq'])), 'node_received': node.get('received'),
        'node_processed': node.get('processed'), 'node_dropped': node.get('dropped'),
        'node_rejected': node.get('rejected'),
        'diag_dropped': int(diag['dropped_frames']) if 'dropped_frames' in diag else None,
        'lost_before_node': len(j['stamps']) - node['received'] if node.get('received') is not None else None,
        'latency': lat_summary(lat),
        'output_rate_hz': n_out / max(1e-9, t1 - t0) if t1 > t0 else None,
        'cpu_percent': mon.cpu_percent(t0, t1 + 0.5),
        'rss_mb_end': mon.rss_at(t1),
        'node_infer_ms': lat_summary(infers) if infers.size else None,
        'stamp_to_inference_start_ms': lat_summary(to_node) if to_node.size else None,
        'node_process_ms': lat_summary(proc) if proc.size else None,
        'publish_call_ms_p50': pct(pub.get('publish_ms', []), 50),
    }, j
