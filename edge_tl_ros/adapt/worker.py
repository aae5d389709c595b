"""The round's worker process and its OS scheduling (no ROS).

:func:`run_round_in_subprocess` runs one round (teacher labels, then :func:`~.round.run_round`) in a fresh
``spawn`` process: niced and optionally ``SCHED_IDLE`` from its first instruction, BLAS / ONNX Runtime
threads bounded, killed with its parent, so the perception node's latency does not suffer. The
adaptation node calls it from a round thread; it returns a :class:`RoundResult` and writes nothing.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from dataclasses import asdict, dataclass

import numpy as np

from ..bundle import Head, HeadRegistry
from ..settings import check, setting
from ..store import FrameStore
from .config import AdaptConfig, RoundResult
from .backbone import backbone_round, choose
from .labels import label_store, overlay_labels
from .round import run_round


@dataclass
class WorkerConfig:
    """How the round process is scheduled (keyword arguments of :func:`run_round_in_subprocess`)."""

    threads: int = setting(1, 'advanced.train_threads',
                           'BLAS / ONNX Runtime threads of the training process.', (1, 64))
    nice_level: int = setting(10, 'advanced.nice_level', 'Niceness added to the training process.', (0, 19))
    sched_idle: bool = setting(True, 'advanced.sched_idle',
                               'Linux: run the training process under SCHED_IDLE (perception preempts it).')
    timeout_s: float = setting(600.0, 'advanced.round_timeout_s',
                               'A round running longer than this is killed.', (1.0, 86400.0))

    def validate(self) -> None:
        check(self)


# -- the round in a separate process ----------------------------------------------------------------------
_ENV_LOCK = threading.Lock()
_THREAD_VARS = ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS')


def _worker_init(nice_level: int, threads: int) -> None:
    """Initializer of the round process: lower priority, bound BLAS threads, die with the parent.

    ``nice_level`` is the niceness the worker must have (absolute); it normally inherited it already
    from the thread that started it (see :func:`_start_niced`)."""
    if nice_level:
        try:
            now = _current_nice()
            if now < nice_level:
                os.nice(int(nice_level) - now)
        except OSError:
            pass
    from ..engine import limit_threads

    limit_threads(threads)
    try:  # Linux: SIGKILL this worker when the node process dies (no orphaned rounds)
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            os._exit(1)
    except (OSError, AttributeError):
        pass


def _current_nice() -> int:
    try:
        return os.getpriority(os.PRIO_PROCESS, 0)
    except (OSError, AttributeError):
        return 0


def _sched_policy_name() -> str:
    try:
        return {getattr(os, 'SCHED_IDLE', -1): 'idle', getattr(os, 'SCHED_BATCH', -1): 'batch'}.get(
            os.sched_getscheduler(0), 'other')
    except (OSError, AttributeError):
        return 'unknown'


def _start_niced(proc, nice: int, threads: int, sched_idle: bool = False) -> None:
    """Start ``proc`` (a ``spawn`` process) already at niceness ``nice`` and with ``threads`` BLAS threads.

    On Linux niceness is per thread and a new process inherits it from the thread that starts it, so a
    short-lived thread lowers its own priority and starts the process: the interpreter start-up and the
    imports (the costly part of a round on a small CPU) then run niced too, not just the training. An
    unprivileged thread cannot raise its priority again, hence the throwaway thread. BLAS reads its
    thread count at import: the spawned interpreter gets these variables at exec time.

    ``sched_idle``: the Linux ``SCHED_IDLE`` policy as well (also inherited): the worker then runs only on
    CPU time nothing else wants, and any normal thread that wakes up preempts it at once."""
    err: list[BaseException] = []

    def start():
        tid = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except (OSError, AttributeError):
            pass  # the worker nices itself in _worker_init
        if sched_idle:
            try:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            except (OSError, AttributeError):
                pass  # not Linux: niceness only
        try:
            with _ENV_LOCK:
                saved = {k: os.environ.get(k) for k in _THREAD_VARS}
                os.environ.update({k: str(int(threads)) for k in _THREAD_VARS})
                try:
                    proc.start()
                finally:
                    for k, v in saved.items():
                        if v is None:
                            os.environ.pop(k, None)
                        else:
                            os.environ[k] = v
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            err.append(e)

    t = threading.Thread(target=start, name='edge_tl_spawn_niced', daemon=True)
    t.start()
    t.join()
    if err:
        raise err[0]


def _round_job(job: dict) -> RoundResult:
    from ..bundle import load_bundle

    startup = time.time() - job['spawned_at'] if job.get('spawned_at') else None
    t0 = time.perf_counter()
    bundle = load_bundle(job['bundle_path'], check_onnx=False)
    registry = HeadRegistry(bundle, job['state_dir'])
    if job.get('base_version') is None:
        head, backbone, _ = registry.load_current_or_fallback(with_backbone=True)
    else:
        head, backbone = registry.load(job['base_version'], with_backbone=True)
    cfg = AdaptConfig(**job['config'])
    store = FrameStore(job['store_root'], readonly=True)
    arr = store.entries(feature_size=head.feature_size)
    t_load = time.perf_counter() - t0
    teacher_labels: dict[int, str] = {}
    teacher_info = None
    if job.get('teacher_bundle') and 'teacher' in cfg.label_sources:
        teacher_labels, teacher_info = label_store(store, arr, job['teacher_bundle'], bundle, head, cfg,
                                                   job.get('threads', 1), job.get('teacher_max_frames'))
        arr = overlay_labels(arr, teacher_labels)
    # the stored features come from the bundle backbone: the head-only candidate exists only while the
    # deployed pair runs on it; the backbone candidate evaluates both pairs from the stored crops
    head_result = run_round(bundle, arr, head, cfg) if backbone is None else None
    backbone_result = None
    if cfg.adapt_backbone:
        labelled = [i for i, (n, s) in enumerate(zip(arr.labels, arr.sources)) if n is not None]
        crops, found = store.crops(arr.stamps)
        row = {int(s): i for i, s in enumerate(found)}
        idx = [i for i in labelled if int(arr.stamps[i]) in row]
        if idx:
            backbone_result = backbone_round(
                bundle, crops[[row[int(arr.stamps[i])] for i in idx]], [arr.labels[i] for i in idx],
                [arr.sources[i] for i in idx], head, backbone, cfg, stats_images=crops,
                threads=job.get('threads', 1))
    if head_result is None and backbone_result is None:
        raise RuntimeError(f'head v{head.version} runs with an adapted backbone and no backbone candidate '
                           'can be made (advanced.adapt_backbone off, or no stored crops): roll back to a '
                           'version on the bundle backbone first')
    result = choose(head_result, backbone_result)
    result.teacher_labels = teacher_labels
    result.metrics['teacher'] = teacher_info
    result.metrics['worker'] = {'pid': os.getpid(), 'nice': os.nice(0),
                                'nice_at_start': job.get('nice_at_start'),
                                'sched_policy': job.get('sched_policy'),
                                'load_seconds': round(t_load, 3),
                                'startup_seconds': None if startup is None else round(startup, 3),
                                'job_seconds': round(time.perf_counter() - t0, 3),
                                'blas_threads': os.environ.get('OPENBLAS_NUM_THREADS'),
                                'teacher_labels': len(teacher_labels)}
    return result


def _round_worker(conn, nice_level: int, threads: int, job: dict) -> None:
    try:
        job['nice_at_start'] = _current_nice()  # before _worker_init: inherited from the starting thread
        job['sched_policy'] = _sched_policy_name()
        _worker_init(nice_level, threads)
        r = _round_job(job)
        head = None if r.head is None else (np.asarray(r.head.weight), np.asarray(r.head.bias),
                                            r.head.class_names, r.head.version)
        payload = ('ok', {'accepted': r.accepted, 'reason': r.reason, 'metrics': r.metrics,
                          'teacher_labels': r.teacher_labels, 'head': head, 'backbone': r.backbone})
    except BaseException as e:  # noqa: BLE001 - report everything to the parent
        payload = ('error', f'{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}')
    try:
        conn.send(payload)
    finally:
        conn.close()


def run_round_in_subprocess(bundle_path, state_dir, store_root, config: AdaptConfig,
                            base_version: int | None = None, teacher_bundle: str | None = None,
                            nice_level: int = 10, threads: int = 1, timeout_s: float = 600.0,
                            cancel: threading.Event | None = None, on_start=None,
                            teacher_max_frames: int | None = None, sched_idle: bool = False) -> RoundResult:
    """Run one round in a fresh ``spawn`` process and return its :class:`RoundResult` (nothing is written).

    The worker is niced by ``nice_level`` (and scheduled ``SCHED_IDLE`` if ``sched_idle``) from its first
    instruction, limited to ``threads`` BLAS/ONNX Runtime threads, and dies with its parent. A crash, kill,
    ``timeout_s`` or ``cancel`` gives ``RoundResult(failed=True)``. ``on_start(pid)`` is called once the
    worker runs (for status reporting and tests).
    """
    import multiprocessing as mp

    config.validate()
    job = {'bundle_path': str(bundle_path), 'state_dir': str(state_dir), 'store_root': str(store_root),
           'config': asdict(config), 'base_version': base_version,
           'teacher_bundle': str(teacher_bundle) if teacher_bundle else None, 'threads': int(threads),
           'teacher_max_frames': teacher_max_frames}
    ctx = mp.get_context('spawn')
    recv, send = ctx.Pipe(duplex=False)
    target_nice = min(19, _current_nice() + max(0, int(nice_level)))
    proc = ctx.Process(target=_round_worker, args=(send, target_nice, int(threads), job), daemon=True,
                       name='edge_tl_adapt_round')
    t0 = time.monotonic()
    t_spawn = time.time()
    job['spawned_at'] = t_spawn
    _start_niced(proc, target_nice, threads, sched_idle)
    send.close()
    if on_start is not None:
        on_start(proc.pid)

    def failed(reason, detail=None):
        m = {'seconds': round(time.monotonic() - t0, 4)}
        if detail:
            m['error'] = detail
        return RoundResult(False, reason, None, m, failed=True)

    try:
        while True:
            if recv.poll(0.1):
                try:
                    status, payload = recv.recv()
                except (EOFError, OSError):
                    proc.join(5)
                    return failed(f'round process died (exit code {proc.exitcode})')
                break
            if not proc.is_alive():
                if recv.poll(0):
                    continue
                return failed(f'round process died (exit code {proc.exitcode})')
            if cancel is not None and cancel.is_set():
                return failed('round cancelled')
            if time.monotonic() - t0 > timeout_s:
                return failed(f'round timed out after {timeout_s:.0f} s')
    finally:
        if proc.is_alive():
            proc.join(2)
        if proc.is_alive():
            proc.kill()
            proc.join(2)
        recv.close()
    if status != 'ok':
        return failed(f'round failed in worker: {payload.splitlines()[0]}', payload)
    head = None
    if payload['head'] is not None:
        w, b, names, ver = payload['head']
        head = Head(w, b, names, ver)
    teacher = {int(k): v for k, v in payload['teacher_labels'].items()}
    return RoundResult(payload['accepted'], payload['reason'], head, payload['metrics'], teacher,
                       backbone=payload.get('backbone'))
