"""adaptation_node: collects frames and labels on the robot and trains better heads, off the hot path.

A thin adapter around :class:`edge_tl_ros.adapt.collector.Collector` (the ROS-free data path: frames and
labels in, frame-store entries out) and :func:`edge_tl_ros.adapt.run_round_in_subprocess` (a round in a
niced worker process). Subscribes ``image`` (or ``image/compressed``), ``labels``
(vision_msgs/Classification: the labelled frame's stamp + results[0].class_id) and, with
``advanced.use_perception_features``, ``<perception_node>/features``.

A round (``~/adapt_now``, every ``round.every_n_labels`` new trainable frames, or every ``round.period_s``)
runs from a round thread, so no callback blocks. An accepted head is written with ``HeadRegistry.add``
(atomic) and ``<perception_node>/reload_head`` is called asynchronously; a rejected, failed or killed round
changes nothing. Publishes ``~/status`` (std_msgs/String JSON, latched) and ``/diagnostics``. Never
publishes frames or features. Parameters: their defaults, ranges and texts live in the settings
dataclasses (:class:`CollectorConfig`, :class:`AdaptConfig`, :class:`WorkerConfig`) and in
:data:`NODE_PARAMETERS`.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import asdict

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from rclpy.node import Node
from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy,
                       qos_profile_sensor_data)
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String
from std_srvs.srv import Trigger
from vision_msgs.msg import Classification

from ..adapt import AdaptConfig, WorkerConfig, run_round_in_subprocess
from ..adapt.collector import Collector, CollectorConfig
from ..bundle import (BundleError, HeadRegistry, default_state_dir, load_bundle, resolve_bundle_path,
                      resolve_teacher)
from ..engine import Engine
from ..fleet.robot import FleetConfig, FleetWorker
from ..settings import from_parameters, parameters
from ..store import FrameStore, stamp_to_ns
from .diagnostics import WARN, RecentCounts, diagnostic_array
from .params import declare_all, run_node
from .reload import HeadReloader

_NODE_NAME = re.compile(r'^/?[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*$')
WARN_WINDOW_S = 10.0  # /diagnostics WARNs for bad input / failed writes seen within this window

# the node's own parameters: name -> (default, descriptor kwargs)
NODE_PARAMETERS = {
    'model_bundle': ('', dict(text='Student model bundle: a directory or a shipped bundle\'s name ("" = '
                                   'gtsrb_student); the same as the perception node\'s.', read_only=True)),
    'teacher_bundle': ('auto', dict(text='Teacher bundle for pseudo-labels: a directory or a shipped bundle'
                                         '\'s name; auto = the one the student was distilled from, if '
                                         'installed; "" = none.', read_only=True)),
    'state_dir': ('', dict(text='Directory of head versions, shared with the perception node '
                                '("" = $ROS_HOME/edge_tl_ros/<bundle name>).', read_only=True)),
    'perception_node': ('perception', dict(text='Name of the perception node whose <name>/reload_head is '
                                                'called after an accepted round.')),
    'use_compressed': (False, dict(text='Subscribe image/compressed instead of image.', read_only=True)),
    'store.dir': ('', dict(text='Frame store directory: empty or the store\'s own ("" = <state_dir>/store).',
                           read_only=True)),
    'round.period_s': (0.0, dict(text='Start a round this often (0 = off).', float_range=(0.0, 1e7))),
    'advanced.diagnostics_period_s': (1.0, dict(text='Diagnostics and status publishing period.',
                                       float_range=(0.1, 60.0), read_only=True)),
    'advanced.executor_threads': (1, dict(text='Executor threads when run as its own process (1 = '
                                      'SingleThreadedExecutor, the least CPU).', read_only=True,
                                 int_range=(1, 16))),
    'advanced.use_perception_features': (False, dict(
        text='Take backbone features from <perception_node>/features (perception deployment_mode '
             'incremental) instead of running the backbone here.', read_only=True)),
    'advanced.keep_head_versions': (20, dict(text='Adapted head versions kept on disk (never the current one '
                                                  'or its rollback target; 0 = keep all).',
                                             int_range=(0, 1_000_000), read_only=True)),
}
_GROUPS = ('', 'store', 'labels', 'round', 'accept', 'fleet', 'advanced')
PARAMETERS = dict(sorted({**NODE_PARAMETERS, **parameters(CollectorConfig), **parameters(AdaptConfig),
                          **parameters(WorkerConfig), **parameters(FleetConfig)}.items(),
                         key=lambda kv: _GROUPS.index(kv[0].split('.')[0] if '.' in kv[0] else '')))


def _settings(values: dict):
    """(CollectorConfig, AdaptConfig, WorkerConfig) from parameter values; ValueError names a bad one."""
    out = (from_parameters(CollectorConfig, values), from_parameters(AdaptConfig, values),
           from_parameters(WorkerConfig, values))
    for cfg in out:
        cfg.validate()
    from_parameters(FleetConfig, values).validate()
    if not _NODE_NAME.match(values['perception_node']):
        raise ValueError(f'perception_node={values["perception_node"]!r} is not a valid node name')
    return out


class _Adaptation:
    """Everything of the adaptation node; :class:`AdaptationNode` (plain) and
    :class:`AdaptationLifecycleNode` (managed) add only when configure / activate happen."""

    def _declare(self) -> None:
        declare_all(self, PARAMETERS)
        self.active = False
        self._subscriptions_in: list = []
        self._own = {'services': [], 'publishers': [], 'timers': []}
        self.add_on_set_parameters_callback(self._on_set_parameters)

    def _configure(self) -> None:
        """Bundle, head registry, engine, frame store, teacher, collector (not started), services,
        publishers, the status timer and the fleet worker (not started); no subscription."""
        p = self._p
        collect_cfg, self.round_cfg, self.worker_cfg = _settings({n: p(n) for n in PARAMETERS})
        self.bundle = load_bundle(resolve_bundle_path(p('model_bundle')))
        self.state_dir = p('state_dir') or str(default_state_dir(self.bundle.name))
        self.registry = HeadRegistry(self.bundle, self.state_dir,
                                     keep_versions=p('advanced.keep_head_versions'))
        head, backbone, warn = self.registry.load_current_or_fallback(with_backbone=True)
        if warn:
            self.get_logger().warning(warn)
        self._followed = head.version  # the registry version this node last took its head from
        # this node stores bundle-backbone features (what rounds train on); a head trained for an adapted
        # backbone does not fit them, so for such a version the bundle head scores frames for selection
        self.engine = Engine(self.bundle, 'feature_extractor', num_threads=1, low_priority=True,
                             head=head if backbone is None else self.bundle.head)
        size = collect_cfg.crop_size
        self.store = FrameStore(p('store.dir') or f'{self.state_dir}/store', collect_cfg.max_entries,
                                collect_cfg.max_bytes, collect_cfg.max_age_s, crop_size=(size, size),
                                feature_size=self.bundle.feature_size)  # StoreError: a directory not its own
        if self.store.corrupt_removed:
            self.get_logger().warning(f'frame store: removed {self.store.corrupt_removed} corrupt entries')
        if self.store.skipped:
            self.get_logger().warning(f'frame store: left alone files it did not write: {self.store.skipped}')
        self.teacher, self.teacher_error = self._find_teacher(p('teacher_bundle'))
        self.collector = Collector(self.engine, self.store, collect_cfg, self.round_cfg,
                                   has_teacher=self.teacher is not None,
                                   use_perception_features=p('advanced.use_perception_features')
                                   and backbone is None,
                                   nice_level=self.worker_cfg.nice_level,
                                   on_round_due=lambda: self.start_round('new labels'),
                                   log=self.get_logger().warning)
        self._stop = threading.Event()
        self._faults = RecentCounts(WARN_WINDOW_S)
        self._round_lock = threading.Lock()
        self._round_thread: threading.Thread | None = None
        self.round_running = False
        self.round_pid: int | None = None
        self.rounds = 0
        self.last_round: dict | None = None

        srv_group = MutuallyExclusiveCallbackGroup()
        self._own['services'] = [
            self.create_service(Trigger, '~/adapt_now', self._srv_adapt_now, callback_group=srv_group),
            self.create_service(Trigger, '~/wipe_store', self._srv_wipe, callback_group=srv_group)]
        status_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                                durability=DurabilityPolicy.TRANSIENT_LOCAL,
                                reliability=ReliabilityPolicy.RELIABLE)
        self.pub_status = self.create_publisher(String, '~/status', status_qos)
        self.pub_diag = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self._own['publishers'] = [self.pub_status, self.pub_diag]
        self._own['timers'] = [self.create_timer(p('advanced.diagnostics_period_s'), self._on_timer,
                                                 callback_group=MutuallyExclusiveCallbackGroup())]
        self._last_periodic_round = time.monotonic()
        self.reloader = HeadReloader(self, p('perception_node'), on_done=self._publish_status)
        self.fleet_cfg = from_parameters(FleetConfig, {n: p(n) for n in PARAMETERS})
        self.fleet: FleetWorker | None = None
        if self.fleet_cfg.enabled:  # Flower is imported by the worker's thread only
            robot = self.fleet_cfg.robot_name or self.get_fully_qualified_name()
            self.fleet = FleetWorker(self.fleet_cfg, robot, self._fleet_offer, self._fleet_judge,
                                     log=self.get_logger().warning)
        self.get_logger().info(
            f'bundle {self.bundle.name}, head v{self._followed}, store {self.store.root} '
            f'({len(self.store)} entries), {self.teacher_how}, '
            f'label sources {list(self.round_cfg.label_sources)}')

    def _activate(self) -> None:
        """Subscriptions (frames, labels, features), the collector's and the fleet's threads; rounds on."""
        p = self._p
        in_group = MutuallyExclusiveCallbackGroup()
        image = (CompressedImage, 'image/compressed') if p('use_compressed') else (Image, 'image')
        subs = [self.create_subscription(*image, self.collector.put_frame, qos_profile_sensor_data,
                                         callback_group=in_group)]
        if p('advanced.use_perception_features'):
            subs.append(self.create_subscription(Image, f'{p("perception_node").rstrip("/")}/features',
                                                 self.collector.put_features, 10, callback_group=in_group))
        label_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100,
                               reliability=ReliabilityPolicy.RELIABLE)
        subs.append(self.create_subscription(Classification, 'labels', self._on_label, label_qos,
                                             callback_group=MutuallyExclusiveCallbackGroup()))
        self._subscriptions_in = subs
        if self.collector._thread is None:
            self.collector.start()
        if self.fleet is not None and self.fleet._thread is None:
            self.fleet.start()
        self.active = True
        self._publish_status()

    def _deactivate(self) -> None:
        """No collection and no new round while inactive (a running round finishes); the store stays."""
        self.active = False
        for sub in self._subscriptions_in:
            self.destroy_subscription(sub)
        self._subscriptions_in = []

    def _cleanup(self) -> None:
        """Undo :meth:`_configure`: threads stopped (a running round is cancelled), entities destroyed."""
        self._deactivate()
        self._shutdown_threads()
        for srv in self._own['services']:
            self.destroy_service(srv)
        for pub in self._own['publishers']:
            self.destroy_publisher(pub)
        for timer in self._own['timers']:
            self.destroy_timer(timer)
        self._own = {'services': [], 'publishers': [], 'timers': []}
        self.__dict__.pop('_stop', None)  # unconfigured: nothing of the configuration is left to stop

    @property
    def reload(self) -> dict | None:
        """How the last ``reload_head`` call went (None before the first accepted round)."""
        return self.reloader.state

    # -- parameters ------------------------------------------------------------------------------------------
    def _p(self, name):
        return self.get_parameter(name).value

    def _find_teacher(self, value: str) -> tuple[str | None, str | None]:
        """Check the teacher now, not in the first round; a bad teacher costs its labels, not the node."""
        try:
            path, self.teacher_how = resolve_teacher(value, self.bundle)
            return (None if path is None else str(load_bundle(path).root)), None
        except BundleError as e:
            self.teacher_how = 'no teacher'
            err = f'teacher_bundle unusable, running without teacher labels: {e}'
            self.get_logger().error(err)
            return None, err

    def _on_set_parameters(self, params) -> SetParametersResult:
        if not hasattr(self, '_stop'):  # lifecycle node not configured: the values are read on configure
            return SetParametersResult(successful=True)
        values = {n: self._p(n) for n in PARAMETERS}
        values.update({prm.name: prm.value for prm in params if prm.name in values})
        try:
            collect_cfg, self.round_cfg, self.worker_cfg = _settings(values)
        except (ValueError, TypeError) as e:
            return SetParametersResult(successful=False, reason=str(e))
        c, old = collect_cfg, self.collector.cfg
        if (c.max_entries, c.max_bytes, c.max_age_s) != (old.max_entries, old.max_bytes, old.max_age_s):
            self.store.set_caps(c.max_entries, c.max_bytes, c.max_age_s)
        self.collector.cfg, self.collector.round_cfg = c, self.round_cfg
        self.reloader.perception_node = values['perception_node']
        self.fleet_cfg = from_parameters(FleetConfig, values)
        if self.fleet is not None:
            self.fleet.cfg = self.fleet_cfg
        return SetParametersResult(successful=True)

    def _on_label(self, msg: Classification) -> None:
        stamp = stamp_to_ns(msg.header.stamp.sec, msg.header.stamp.nanosec)
        reason = self.collector.put_label(stamp, msg.results[0].class_id if msg.results else '')
        if reason is not None:
            n = self.collector.counters['labels_bad']
            self.get_logger().warning(f'label message ignored ({reason}; {n} so far)',
                                      throttle_duration_sec=5.0)

    # -- rounds ----------------------------------------------------------------------------------------------
    def start_round(self, why: str) -> tuple[bool, str]:
        """Start a round in the background; returns (started, message)."""
        with self._round_lock:
            if self.round_running:
                return False, 'a round is already running'
            if self._stop.is_set():
                return False, 'node is shutting down'
            if not self.active:
                return False, 'node is inactive (lifecycle): no rounds'
            self.round_running = True
            self.collector.since_round = 0
            self._round_thread = threading.Thread(target=self._round, args=(why,), name='edge_tl_round',
                                                  daemon=True)
            self._round_thread.start()
        return True, f'round started ({why})'

    def _round(self, why: str) -> None:
        t0 = time.time()
        try:
            self.get_logger().info(f'adaptation round started ({why}), base head v{self._followed}')
            self.round_pid = None

            def started(pid):
                self.round_pid = pid
                self._publish_status()

            try:
                base = self.registry.current_version
            except BundleError:
                base = None
            w = self.worker_cfg
            result = run_round_in_subprocess(
                self.bundle.root, self.state_dir, self.store.root, self.round_cfg, base_version=base,
                teacher_bundle=self.teacher, cancel=self._stop, on_start=started, **asdict(w))
            for stamp, name in result.teacher_labels.items():
                self.store.set_label(stamp, name, 'teacher')
            summary = result.summary()
            summary.update(started=t0, finished=time.time(), trigger=why, committed_version=None)
            if result.accepted:
                try:  # HeadRegistry.add: atomic file + index
                    head = self.registry.add(result.head, {**result.metrics, 'reason': result.reason},
                                             backbone=result.backbone)
                except (BundleError, OSError, ValueError) as e:
                    summary.update(accepted=False, failed=True, reason=f'could not write the head: {e}')
                    self.get_logger().error(summary['reason'])
                else:
                    self._take_head(head, result.backbone)
                    summary['committed_version'] = head.version
                    self.get_logger().info(f'round accepted: head v{head.version} ({result.reason})')
                    self.reloader.request(head.version)
                    if self.fleet is not None:
                        self.fleet.trigger('accepted round')
            # one call site per severity: rclpy raises "Logger severity cannot be changed between calls"
            # when the same line logs at two severities (it crashed every later round)
            elif result.failed:
                self.get_logger().warning(f'round failed: {result.reason}')
            else:
                self.get_logger().info(f'round rejected: {result.reason}')
            self.last_round = summary
            self.rounds += 1
        except Exception as e:  # the round thread must always clear round_running
            self.last_round = {'accepted': False, 'failed': True, 'reason': f'{type(e).__name__}: {e}',
                               'started': t0, 'finished': time.time(), 'trigger': why, 'metrics': {}}
            self.get_logger().error(f'adaptation round crashed: {e}')
        finally:
            self.round_running = False
            self.round_pid = None
            if not self._stop.is_set():
                self._publish_status()

    def _follow_registry(self) -> None:
        """Use the registry's current head (another process, e.g. the perception node's ~/rollback, may
        have moved it), so both nodes agree on the version and rounds start from the deployed head."""
        try:
            current = self.registry.current_version
            if current == self._followed or self.round_running:
                return
            head, backbone = self.registry.load(current, with_backbone=True)
        except Exception as e:  # an unreadable registry: keep the head in use, say why once in a while
            self.get_logger().warning(f'head registry unreadable, keeping head v{self._followed}: '
                                      f'{e}', throttle_duration_sec=30.0)
            return
        self.get_logger().info(f'head registry moved to v{head.version}: following it '
                               f'(was v{self._followed})')
        self._take_head(head, backbone)

    def _take_head(self, head, backbone: bytes | None) -> None:
        """Follow registry version ``head.version``. The stored features stay the bundle backbone's (rounds
        train on them), so while a version with an adapted backbone is deployed its head is not used here
        (selection scores with the bundle head) and neither are the perception node's features."""
        self._followed = head.version
        self.engine.swap_head(head if backbone is None else self.bundle.head)
        # the perception node's ~/features come from the backbone it runs: reuse them only while that is
        # the bundle's (otherwise this node computes bundle-backbone features itself)
        reuse = self._p('advanced.use_perception_features')
        self.collector.use_perception_features = reuse and backbone is None

    # -- fleet (edge_tl_ros.fleet: called from the fleet worker's thread) ----------------------------------
    def _fleet_current(self):
        head, backbone = self.registry.load(self._followed, with_backbone=True)
        if backbone is not None:
            raise RuntimeError(f'head v{head.version} runs on an adapted backbone; the fleet shares heads on '
                               'the bundle backbone\'s features')
        return head

    def _fleet_offer(self, fleet):
        """What leaves the robot (Flower's fit): the deployed head, or with fleet.local_training the
        round's recipe trained from the fleet head on the stored frames; and label counts by source."""
        counts = self.store.label_counts()
        head = self._fleet_current()
        if self.fleet_cfg.local_training and fleet is not None:
            from ..fleet.gate import fit_to
            from ..fleet.local import local_step

            cfg = self.round_cfg
            data = self.store.entries(labelled_only='self' not in cfg.label_sources,
                                      feature_size=self.bundle.feature_size)
            head = local_step(self.bundle, data, fit_to(fleet, head), cfg)
        return head, {k: counts.get(k, 0) for k in ('topic', 'teacher', 'self')}

    def _fleet_judge(self, fleet, final: bool) -> dict:
        """The fleet head through this robot's gate (local holdout + source anchor); on a session's last
        round an accepted one becomes a registry version (perception reloads it; rollback as ever)."""
        from ..fleet.gate import gate_fleet_head

        current = self._fleet_current()
        cfg = self.round_cfg
        data = self.store.entries(labelled_only='self' not in cfg.label_sources,
                                  feature_size=self.bundle.feature_size)
        r = gate_fleet_head(self.bundle, data, current, fleet, cfg, margin=self.fleet_cfg.margin)
        m = r.metrics
        out = {'accepted': False, 'holdout_acc_fleet': m.get('holdout_acc_new'),
               'holdout_acc_local': m.get('holdout_acc_old'), 'n_holdout': m.get('n_holdout', 0)}
        if not final:
            return out
        if r.accepted:
            head = self.registry.add(r.head, {**m, 'reason': r.reason, 'fleet_round': fleet.version})
            self._take_head(head, None)
            self.get_logger().info(f'fleet head accepted: head v{head.version} ({r.reason})')
            self.reloader.request(head.version)
            out.update(accepted=True, committed_version=head.version)
        else:
            self.get_logger().info(f'fleet head rejected: {r.reason}')
        self._publish_status()
        return out

    # -- services --------------------------------------------------------------------------------------------
    def _srv_adapt_now(self, request, response):
        response.success, response.message = self.start_round('adapt_now')
        return response

    def _srv_wipe(self, request, response):
        n, left = self.collector.wipe()  # memory too: nothing taken in before the wipe is stored after it
        if left:  # e.g. a read-only file system: say so, never report a wipe that did not happen
            response.success = False
            response.message = f'could not delete {left} stored frames: {self.store.last_error}'
            self.get_logger().error(response.message)
        else:
            response.success, response.message = True, f'wiped {n} stored frames'
            self.get_logger().info(response.message)
        self._publish_status()
        return response

    # -- status / diagnostics --------------------------------------------------------------------------------
    def _on_timer(self) -> None:
        self.reloader.check_timeout()
        self._follow_registry()
        self.store.evict_expired()
        period = self._p('round.period_s')
        now = time.monotonic()
        if period > 0 and now - self._last_periodic_round >= period:
            self._last_periodic_round = now
            self.start_round('round.period_s')
        self._publish_status()
        self._publish_diagnostics()

    def status(self) -> dict:
        try:
            current = self.registry.current_version
        except BundleError:
            current = None
        c = self.collector
        return {
            'node': self.get_fully_qualified_name(), 'pid': os.getpid(), 'bundle': self.bundle.name,
            'active': self.active,
            'head_version': self._followed, 'registry_version': current,
            'store': self.store.stats(), 'label_counts': self.store.label_counts(),
            'counters': dict(c.counters), 'bad_frames': dict(c.bad_frames),
            'bad_labels': dict(c.bad_labels), 'bad_features': dict(c.bad_features),
            'frames_dropped': c.frames_dropped(), 'memory': c.memory(), 'labels_dropped': c.labels_dropped(),
            'pending_labels': c.pending_labels, 'new_since_round': c.since_round,
            'round': {'running': self.round_running, 'pid': self.round_pid, 'count': self.rounds,
                      'last': self.last_round},
            'reload': self.reload, 'teacher': self.teacher, 'teacher_error': self.teacher_error,
            'fleet': self.fleet.status() if self.fleet is not None else {'enabled': False},
        }

    def _publish_status(self) -> None:
        try:
            self.pub_status.publish(String(data=json.dumps(self.status(), default=_json_default)))
        except Exception as e:  # publishing during shutdown
            self.get_logger().debug(f'status not published: {e}')

    def _publish_diagnostics(self) -> None:
        s, c = self.store.stats(), self.collector
        recent = self._faults.update({k: c.counters[k] for k in ('frames_bad', 'labels_bad', 'features_bad')}
                                     | {'store_dropped': s['dropped']})
        last = self.last_round or {}
        problems = []
        if last.get('failed'):
            problems.append((WARN, f'last round failed: {last.get("reason")}'))
        if recent['store_dropped']:
            problems.append((WARN, f'{recent["store_dropped"]} frames not stored in the last '
                                   f'{WARN_WINDOW_S:.0f} s ({s["last_error"]})'))
        if self.teacher_error:
            problems.append((WARN, self.teacher_error))
        if self.fleet is not None and self.fleet.last_error:
            problems.append((WARN, f'fleet: {self.fleet.last_error} ({self.fleet.failures} failures)'))
        if recent['frames_bad'] or recent['labels_bad'] or recent['features_bad']:
            problems.append((WARN, f'bad input in the last {WARN_WINDOW_S:.0f} s: {recent["frames_bad"]} '
                                   f'frames, {recent["labels_bad"]} labels, {recent["features_bad"]} '
                                   'features messages '
                                   f'(all time: frames {dict(c.bad_frames)}, labels {dict(c.bad_labels)})'))
        kv = {'head_version': self._followed, 'store_entries': s['entries'],
              'store_bytes': s['bytes'], 'store_dropped': s['dropped'], 'store_evicted': s['evicted'],
              'store_skipped': sum(s['skipped'].values()),
              'store_skipped_non_finite': s['skipped_non_finite'],
              'round_running': self.round_running, 'rounds': self.rounds,
              'last_round_accepted': last.get('accepted'), 'last_round_reason': last.get('reason'),
              'pending_labels': c.pending_labels}
        teacher = (last.get('metrics') or {}).get('teacher') or {}
        if teacher:  # how the last round's teacher labelled: test_time_norm or plain (and why)
            kv['teacher_mode'] = teacher.get('mode')
            if teacher.get('note'):
                kv['teacher_note'] = teacher['note']
        if self.fleet is not None:
            f = self.fleet
            kv.update(fleet_sessions=f.sessions, fleet_accepted=f.accepted, fleet_rejected=f.rejected,
                      fleet_failures=f.failures, fleet_last_error=f.last_error or '')
        kv.update({f'labels.{k}': v for k, v in s['labels'].items()})
        kv.update(c.counters)
        kv['labels_dropped'] = c.labels_dropped()
        try:
            self.pub_diag.publish(diagnostic_array(self, 'adaptation', self.bundle.name, problems, kv,
                                                   'round running' if self.round_running else
                                                   'ok' if self.active else
                                                   'inactive (lifecycle): not collecting, no rounds'))
        except Exception as e:
            self.get_logger().debug(f'diagnostics not published: {e}')

    def _shutdown_threads(self) -> None:
        # also called by rclpy.try_shutdown() on a node whose __init__ failed half-way
        if hasattr(self, '_stop') and hasattr(self, 'collector'):
            self._stop.set()  # also cancels a running round (its process is killed)
            if getattr(self, 'fleet', None) is not None:
                self.fleet.stop()
            self.collector.close()
            t = self._round_thread
            if t is not None and t.is_alive():
                t.join(timeout=5.0)


class AdaptationNode(_Adaptation, Node):
    """Frame collection, labels and adaptation rounds; usable in-process (tests) or via ``main``. A plain
    node: the constructor configures and activates."""

    def __init__(self, node_name: str = 'adaptation', **kwargs):
        Node.__init__(self, node_name, **kwargs)
        self._declare()
        self._configure()
        self._activate()

    def destroy_node(self):
        self._shutdown_threads()
        return Node.destroy_node(self)


class AdaptationLifecycleNode(_Adaptation, LifecycleNode):
    """The adaptation node as a managed node: ``configure`` opens the store and loads the models,
    ``activate`` starts collecting and allows rounds, ``deactivate`` stops both (the store stays),
    ``cleanup`` closes everything."""

    def __init__(self, node_name: str = 'adaptation', **kwargs):
        LifecycleNode.__init__(self, node_name, **kwargs)
        self._declare()

    def on_configure(self, state) -> TransitionCallbackReturn:
        try:
            self._configure()
        except Exception as e:  # a bad bundle, store directory or parameter: this transition fails
            self.get_logger().error(f'configure failed: {type(e).__name__}: {e}')
            try:
                self._cleanup()
            except Exception:
                pass
            return TransitionCallbackReturn.FAILURE
        self._publish_status()
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state) -> TransitionCallbackReturn:
        self._activate()
        self.get_logger().info('active: collecting frames, rounds on')
        return super().on_activate(state)

    def on_deactivate(self, state) -> TransitionCallbackReturn:
        self._deactivate()
        self._publish_status()
        self.get_logger().info('inactive: no collection, no rounds')
        return super().on_deactivate(state)

    def on_cleanup(self, state) -> TransitionCallbackReturn:
        self._cleanup()
        return super().on_cleanup(state)

    def on_shutdown(self, state) -> TransitionCallbackReturn:
        if hasattr(self, '_stop'):
            self._cleanup()
        return super().on_shutdown(state)

    def destroy_node(self):
        self._shutdown_threads()
        return LifecycleNode.destroy_node(self)


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def main(args=None) -> int:
    return run_node(AdaptationNode, 'adaptation', args=args)  # executor: advanced.executor_threads


def lifecycle_main(args=None) -> int:
    return run_node(AdaptationLifecycleNode, 'adaptation', args=args)


if __name__ == '__main__':
    raise SystemExit(main())
