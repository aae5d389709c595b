"""Replay a rosbag2 bag with rclpy at its recorded timing (``edge-tl replay``), in-process or standalone.

The bag is read with ``rosbags`` (no rosbag2 C++ install needed) and each message is published as the
recorded CDR bytes (``Publisher.publish(bytes)``, rclpy's ``publish_raw``): no deserialisation, no
Python message objects. On an rclpy without raw publishing the replayer falls back to
``rclpy.serialization.deserialize_message`` + ``publish`` (detected on the first message).

Timing: message ``i`` is published at ``wall_start + (t_i - t_first) / rate`` where ``t`` are the bag's
recording timestamps and ``t_first`` is the first message played (after ``start_offset``); ``rate=0``
publishes as fast as possible (benchmarks). ``clock=True`` publishes ``rosgraph_msgs/Clock`` on
``/clock`` with the bag time (at ``clock_hz`` while waiting and before each message), so nodes with
``use_sim_time`` follow the bag.

QoS: non-image topics (labels) are reliable, keep-last 10. Image topics are reliable keep-last 10 by
default, so replaying into a reliable subscriber loses nothing (a reliable publisher also serves
best-effort subscribers such as the perception node's sensor-data input); ``image_qos='best_effort'``
gives the sensor-data profile (best effort, keep-last 5) instead.

This module is the only place in ``edge_tl_ros.bags`` that imports rclpy.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import rclpy
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.serialization import deserialize_message

from .io import IMAGE_TYPES, BagError, bag_info, read_bag

IMAGE_QOS = ('reliable', 'best_effort')
CLOCK_TOPIC = '/clock'


def parse_remaps(remap: Mapping[str, str] | Iterable[str] | None) -> dict[str, str]:
    """``['/camera/image:=/image', ...]`` (or a dict) -> ``{'/camera/image': '/image'}``."""
    if not remap:
        return {}
    if isinstance(remap, Mapping):
        items = list(remap.items())
    else:
        items = []
        for r in remap:
            if ':=' not in r:
                raise BagError(f'bad remap {r!r}: expected FROM:=TO, e.g. /camera/image:=/image')
            a, b = r.split(':=', 1)
            items.append((a, b))
    out = {}
    for a, b in items:
        a, b = a.strip(), b.strip()
        if not a or not b:
            raise BagError(f'bad remap {a!r}:={b!r}: both topic names are needed')
        out[a if a.startswith('/') else '/' + a] = b
    return out


def message_class(msgtype: str):
    """The rclpy message class for ``pkg/msg/Name`` (raises BagError if the package is not installed)."""
    try:
        pkg, kind, name = msgtype.split('/')
    except ValueError:
        raise BagError(f'unexpected message type name {msgtype!r}') from None
    try:
        return getattr(importlib.import_module(f'{pkg}.{kind}'), name)
    except (ImportError, AttributeError) as e:
        hint = ' (build it with `make setup`)' if pkg == 'vision_msgs' else ''
        raise BagError(f'cannot publish {msgtype}: the ROS message package {pkg} is not importable{hint}; '
                       'leave its topic out with --topics') from e


def image_qos_profile(kind: str) -> QoSProfile:
    if kind not in IMAGE_QOS:
        raise BagError(f'unknown image QoS {kind!r}; choose one of {", ".join(IMAGE_QOS)}')
    if kind == 'reliable':
        return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                          durability=DurabilityPolicy.VOLATILE)
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.BEST_EFFORT,
                      durability=DurabilityPolicy.VOLATILE)


LABEL_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                       durability=DurabilityPolicy.VOLATILE)
CLOCK_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                       durability=DurabilityPolicy.VOLATILE)


@dataclass
class ReplayStats:
    published: dict = field(default_factory=dict)  # output topic -> count
    loops: int = 0
    wall_time: float = 0.0
    bag_time: float = 0.0  # bag seconds covered (summed over loops)
    mode: str = 'serialized'  # or 'deserialized'
    lateness_p50_ms: float = 0.0
    lateness_max_ms: float = 0.0
    clock_published: int = 0
    stopped: bool = False

    @property
    def total(self) -> int:
        return sum(self.published.values())

    @property
    def rate_achieved(self) -> float:
        return self.total / self.wall_time if self.wall_time > 0 else 0.0

    def summary(self) -> str:
        topics = ', '.join(f'{t}: {n}' for t, n in self.published.items())
        return (f'published {self.total} messages ({topics}) in {self.wall_time:.2f} s '
                f'({self.rate_achieved:.0f} msg/s, {self.mode}), {self.loops} loop(s), '
                f'lateness p50 {self.lateness_p50_ms:.2f} ms max {self.lateness_max_ms:.2f} ms'
                + (f', {self.clock_published} /clock' if self.clock_published else '')
                + (' [stopped]' if self.stopped else ''))


class Replayer:
    """Publish a bag's messages on ``node`` at the recorded timing.

    ``remap``: ``{'/camera/image': '/image'}`` or ``['/camera/image:=/image']``; ``topics``: bag topics
    to play (default all); ``start_offset``: seconds into the bag to start at; ``rate``: playback speed
    (0 = as fast as possible); ``loop``: start over at the end until stopped; ``clock``: publish
    ``/clock``; ``serialized``: publish the recorded bytes (False forces deserialise + publish);
    ``wait_for_subscribers``: wait up to this many seconds until every publisher has a subscriber.
    """

    def __init__(self, node, bag: str | os.PathLike, rate: float = 1.0,
                 remap: Mapping[str, str] | Iterable[str] | None = None, loop: bool = False,
                 start_offset: float = 0.0, clock: bool = False, topics: Iterable[str] | None = None,
                 image_qos: str = 'reliable', serialized: bool = True, clock_hz: float = 40.0,
                 wait_for_subscribers: float = 0.0):
        if rate < 0:
            raise BagError(f'rate must be >= 0 (0 = as fast as possible), got {rate}')
        if start_offset < 0:
            raise BagError(f'start offset must be >= 0 s, got {start_offset}')
        self.node = node
        self.bag = Path(bag).expanduser()
        self.info = bag_info(self.bag)
        self.rate = float(rate)
        self.loop = bool(loop)
        self.start_offset = float(start_offset)
        self.remap = parse_remaps(remap)
        self.clock = bool(clock)
        self.clock_hz = max(1.0, float(clock_hz))
        self.serialized = bool(serialized)
        self.wait_for_subscribers = float(wait_for_subscribers)
        if topics:
            topics = list(topics)
            missing = [t for t in topics if t not in self.info.topics]
            if missing:
                raise BagError(f'{self.bag}: no topic(s) {missing} in the bag; '
                               f'it has {sorted(self.info.topics)}')
        else:
            topics = list(self.info.topics)
        unknown_remaps = set(self.remap) - set(self.info.topics)
        if unknown_remaps:
            raise BagError(f'remap of {sorted(unknown_remaps)}: no such topic in the bag '
                           f'{sorted(self.info.topics)}')
        self.topics = topics
        self._image_qos = image_qos_profile(image_qos)
        self.publishers = {}
        self.classes = {}
        for t in topics:
            msgtype = self.info.topics[t].msgtype
            cls = message_class(msgtype)
            qos = self._image_qos if msgtype in IMAGE_TYPES else LABEL_QOS
            self.classes[t] = cls
            self.publishers[t] = node.create_publisher(cls, self.out_topic(t), qos)
        self._clock_pub = None
        if self.clock:
            from rosgraph_msgs.msg import Clock

            self._clock_cls = Clock
            self._clock_pub = node.create_publisher(Clock, CLOCK_TOPIC, CLOCK_QOS)
        self._raw_ok = True

    def out_topic(self, bag_topic: str) -> str:
        return self.remap.get(bag_topic, bag_topic)

    # -- helpers -------------------------------------------------------------------------------------------
    def _ok(self, stop: threading.Event) -> bool:
        return not stop.is_set() and self.node.context.ok()

    def _wait_subscribers(self, stop: threading.Event) -> None:
        if self.wait_for_subscribers <= 0:
            return
        deadline = time.monotonic() + self.wait_for_subscribers
        pubs = list(self.publishers.values()) + ([self._clock_pub] if self._clock_pub else [])
        while self._ok(stop) and time.monotonic() < deadline:
            if all(p.get_subscription_count() > 0 for p in pubs):
                return
            stop.wait(0.01)
        lonely = [p.topic_name for p in pubs if p.get_subscription_count() == 0]
        if lonely and self._ok(stop):
            self.node.get_logger().warning(
                f'no subscriber on {", ".join(lonely)} after {self.wait_for_subscribers:g} s; '
                'replaying anyway')

    def _publish_clock(self, bag_ns: int, stats: ReplayStats) -> None:
        msg = self._clock_cls()
        msg.clock.sec = int(bag_ns // 1_000_000_000)
        msg.clock.nanosec = int(bag_ns % 1_000_000_000)
        self._clock_pub.publish(msg)
        stats.clock_published += 1
        self._last_clock = time.monotonic()

    def _publish(self, topic: str, raw: bytes) -> None:
        pub = self.publishers[topic]
        if self.serialized and self._raw_ok:
            try:
                pub.publish(raw)
                return
            except TypeError:  # rclpy without raw publishing: fall back for good
                self._raw_ok = False
        pub.publish(deserialize_message(raw, self.classes[topic]))

    def _sleep_until(self, target: float, stop: threading.Event, bag_ns_at) -> None:
        """Sleep until monotonic ``target``, publishing /clock at clock_hz meanwhile."""
        period = 1.0 / self.clock_hz
        while self._ok(stop):
            now = time.monotonic()
            left = target - now
            if self._clock_pub is not None and now - self._last_clock >= period:
                self._publish_clock(bag_ns_at(min(now, target)), self._stats)  # never ahead of the bag
            if left <= 0:
                return
            step = min(left, period) if self._clock_pub is not None else left
            if step > 0.002:
                stop.wait(step - 0.001)
            else:
                time.sleep(max(step, 0.0))

    # -- main loop -----------------------------------------------------------------------------------------
    def run(self, stop_event: threading.Event | None = None) -> ReplayStats:
        """Replay (looping if asked) until the bag ends or ``stop_event`` is set; returns stats."""
        stop = stop_event or threading.Event()
        stats = self._stats = ReplayStats(published={self.out_topic(t): 0 for t in self.topics})
        self._last_clock = -1e9
        self._wait_subscribers(stop)
        start_ns = self.info.start_ns + int(self.start_offset * 1e9) if self.start_offset else None
        late = []
        wall_begin = time.monotonic()
        try:
            while self._ok(stop):
                t_first = wall0 = None
                t_last = None
                played = 0

                def bag_ns_at(now):
                    if t_first is None:
                        return self.info.start_ns
                    return t_first + int((now - wall0) * self.rate * 1e9)

                for m in read_bag(self.bag, self.topics, start=start_ns):
                    if not self._ok(stop):
                        break
                    if t_first is None:
                        t_first, wall0 = m.timestamp, time.monotonic()
                    if self.rate > 0:
                        target = wall0 + (m.timestamp - t_first) / 1e9 / self.rate
                        self._sleep_until(target, stop, bag_ns_at)
                        if not self._ok(stop):
                            break
                        late.append(time.monotonic() - target)
                    if self._clock_pub is not None and (
                            self.rate == 0 or time.monotonic() - self._last_clock >= 1.0 / self.clock_hz):
                        self._publish_clock(m.timestamp, stats)
                    try:
                        self._publish(m.topic, m.rawdata)
                    except Exception:
                        if self.node.context.ok():
                            raise
                        break  # the context was shut down under us (Ctrl-C): stop quietly
                    stats.published[self.out_topic(m.topic)] += 1
                    t_last = m.timestamp
                    played += 1
                if t_first is not None and t_last is not None:
                    stats.bag_time += (t_last - t_first) / 1e9
                if played == 0:
                    if start_ns is not None:
                        raise BagError(f'{self.bag}: nothing to play after start offset '
                                       f'{self.start_offset} s (the bag lasts {self.info.duration:.2f} s)')
                    break
                stats.loops += 1
                if not self.loop:
                    break
                # a pause of one median gap between loops, so the last and first message are not glued
                gap = self.info.duration / max(1, self.info.message_count - 1)
                if self.rate > 0 and gap > 0:
                    self._sleep_until(time.monotonic() + gap / self.rate, stop, bag_ns_at)
        finally:
            stats.wall_time = time.monotonic() - wall_begin
            stats.stopped = stop.is_set() or not self.node.context.ok()
            stats.mode = 'serialized' if (self.serialized and self._raw_ok) else 'deserialized'
            if late:
                import numpy as np

                arr = np.asarray(late) * 1e3
                stats.lateness_p50_ms = float(np.percentile(arr, 50))
                stats.lateness_max_ms = float(arr.max())
        self._flush()
        return stats

    def _flush(self, timeout: float = 2.0) -> None:
        """Wait (bounded) until reliable subscribers acknowledged everything, so nothing is lost on exit."""
        if not self.node.context.ok():
            return
        from rclpy.duration import Duration

        for pub in self.publishers.values():
            try:
                pub.wait_for_all_acked(Duration(seconds=timeout))
            except Exception:  # not available / context shutting down: best effort only
                pass

    def close(self) -> None:
        """Destroy the publishers (the node stays)."""
        for pub in list(self.publishers.values()) + ([self._clock_pub] if self._clock_pub else []):
            try:
                self.node.destroy_publisher(pub)
            except Exception:
                pass
        self.publishers.clear()
        self._clock_pub = None


def replay_main(args) -> int:
    """``edge-tl replay``: a node ``edge_tl_replay`` publishing the bag; Ctrl-C stops it."""
    from ..nodes.bringup import apply_fastdds_profile

    bag_info(args.bag)  # a missing/corrupt bag fails here, before any ROS setup
    try:
        profile = apply_fastdds_profile(getattr(args, 'fastdds_profile', ''))
    except ValueError as e:
        raise BagError(str(e)) from None
    rclpy.init()
    node = rclpy.create_node('edge_tl_replay')
    stop = threading.Event()
    try:
        rep = Replayer(node, args.bag, rate=args.rate, remap=args.remap, loop=args.loop,
                       start_offset=args.start_offset, clock=args.clock, topics=args.topics or None,
                       image_qos=args.image_qos, serialized=not args.deserialize, clock_hz=args.clock_hz,
                       wait_for_subscribers=args.wait_for_subscribers)
        info = rep.info
        node.get_logger().info(
            f'replaying {info.path} ({info.storage}, {info.message_count} messages, {info.duration:.1f} s) '
            f'at rate {args.rate}' + (' looping' if args.loop else '') + f'; Fast DDS profile {profile}' +
            ''.join(f'; {t} -> {rep.out_topic(t)}' for t in rep.topics))
        try:
            stats = rep.run(stop)
        except KeyboardInterrupt:
            stop.set()
            return 130
        print(stats.summary())
        return 0
    finally:
        node.destroy_node()
        if rclpy.ok():
            rclpy.try_shutdown()
