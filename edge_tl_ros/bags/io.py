"""rosbag2 bags of labelled camera frames, written and read with the pure-Python ``rosbags`` library.

A bag made here holds, per frame, a ``sensor_msgs/Image`` (``rgb8``/``bgr8``) or a
``sensor_msgs/CompressedImage`` (JPEG/PNG) on the image topic and a ``vision_msgs/Classification``
on the label topic with the *same header stamp* and ``results=[ObjectHypothesis(class_id=<class
name>, score=1.0)]`` (the adaptation node's label interface, see ``docs/CONTRIBUTING.md``). Both
rosbag2 storages are supported: ``sqlite3`` (``.db3``) and ``mcap``; the storage is detected on read
(a bag directory with ``metadata.yaml``, or a bare ``.db3``/``.mcap`` file).

vision_msgs is not in the rosbags type stores, so :func:`typestore` registers ``ObjectHypothesis`` and
``Classification`` with the field layout of vision_msgs 4.x (wire-identical to the real package).
Any problem with a bag (missing, truncated, corrupt, no ``metadata.yaml``) raises :class:`BagError`
with one clear message.

No ROS imports here: the robot-side code never needs this module, and it works without a ROS install.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..imaging import FrameError, decode_compressed, encode_compressed, image_view, to_order

IMAGE = 'sensor_msgs/msg/Image'
COMPRESSED_IMAGE = 'sensor_msgs/msg/CompressedImage'
CLASSIFICATION = 'vision_msgs/msg/Classification'
OBJECT_HYPOTHESIS = 'vision_msgs/msg/ObjectHypothesis'
IMAGE_TYPES = (IMAGE, COMPRESSED_IMAGE)
STORAGES = ('sqlite3', 'mcap')
DEFAULT_IMAGE_TOPIC = '/camera/image'
DEFAULT_COMPRESSED_TOPIC = '/camera/image/compressed'
DEFAULT_LABEL_TOPIC = '/labels'
CUSTOM_KEY = 'edge_tl_ros'  # metadata.yaml custom_data key holding JSON (class names, fps, shift, ...)

# vision_msgs 4.x definitions (fields and order exactly as the real package)
OBJECT_HYPOTHESIS_MSG = """
string class_id
float64 score
"""
CLASSIFICATION_MSG = """
std_msgs/Header header
vision_msgs/ObjectHypothesis[] results
"""


class BagError(ValueError):
    """A bag that cannot be written or read (missing, truncated, corrupt, unexpected content)."""


# -- type store ------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def typestore():
    """The rosbags type store (newest ROS 2 distro known to rosbags) plus vision_msgs."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    names = ('ROS2_KILTED', 'ROS2_JAZZY', 'ROS2_HUMBLE')  # newest first; the wire format is the same
    store = next(getattr(Stores, s) for s in names if hasattr(Stores, s))
    ts = get_typestore(store)
    types = {}
    types.update(get_types_from_msg(OBJECT_HYPOTHESIS_MSG, OBJECT_HYPOTHESIS))
    types.update(get_types_from_msg(CLASSIFICATION_MSG, CLASSIFICATION))
    ts.register(types)
    return ts


def _register_from_bag(connections) -> None:
    """Register message types a bag brings along (its stored definitions) that the store lacks."""
    from rosbags.typesys import get_types_from_idl, get_types_from_msg

    ts = typestore()
    for conn in connections:
        if conn.msgtype in ts.types or conn.msgdef is None or not conn.msgdef.data:
            continue
        try:
            fmt = getattr(conn.msgdef.format, 'name', str(conn.msgdef.format))
            parse = get_types_from_idl if fmt == 'IDL' else get_types_from_msg
            types = parse(conn.msgdef.data) if fmt == 'IDL' else parse(conn.msgdef.data, conn.msgtype)
            ts.register(types)
        except Exception:  # an unparsable definition only matters if someone decodes that topic
            pass


def serialize(msg, msgtype: str) -> bytes:
    return bytes(typestore().serialize_cdr(msg, msgtype))


def deserialize(rawdata, msgtype: str):
    ts = typestore()
    if msgtype not in ts.types:
        raise BagError(f'message type {msgtype} is unknown to the rosbags type store (and the bag has no '
                       'usable definition for it)')
    try:
        return ts.deserialize_cdr(rawdata, msgtype)
    except Exception as e:  # rosbags raises assorted errors on corrupt CDR
        raise BagError(f'cannot deserialize a {msgtype} message ({type(e).__name__}: {e}); '
                       'the bag is corrupt') from e


# -- message construction --------------------------------------------------------------------------------

def _header(stamp_ns: int, frame_id: str):
    ts = typestore()
    Time = ts.types['builtin_interfaces/msg/Time']
    Header = ts.types['std_msgs/msg/Header']
    return Header(stamp=Time(sec=int(stamp_ns // 1_000_000_000), nanosec=int(stamp_ns % 1_000_000_000)),
                  frame_id=frame_id)


def stamp_ns(header) -> int:
    """Header stamp in nanoseconds (works for rosbags and rclpy messages)."""
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def image_msg(rgb: np.ndarray, stamp: int, frame_id: str = 'camera', encoding: str = 'rgb8'):
    """A rosbags sensor_msgs/Image holding the RGB uint8 frame as ``rgb8`` or ``bgr8``."""
    if encoding not in ('rgb8', 'bgr8'):
        raise BagError(f'image encoding {encoding!r} not supported for writing; use rgb8 or bgr8')
    img = np.ascontiguousarray(rgb if encoding == 'rgb8' else rgb[..., ::-1])
    h, w = img.shape[:2]
    Image = typestore().types[IMAGE]
    return Image(header=_header(stamp, frame_id), height=h, width=w, encoding=encoding, is_bigendian=0,
                 step=w * 3, data=img.reshape(-1))


def compressed_msg(rgb: np.ndarray, stamp: int, frame_id: str = 'camera', fmt: str = 'jpeg',
                   quality: int = 90):
    """A rosbags sensor_msgs/CompressedImage (format string as image_transport writes it)."""
    data = encode_compressed(rgb, order='rgb', fmt=fmt, quality=quality)
    Compressed = typestore().types[COMPRESSED_IMAGE]
    fmt_str = f'rgb8; {fmt} compressed bgr8'
    return Compressed(header=_header(stamp, frame_id), format=fmt_str, data=np.frombuffer(data, np.uint8))


def label_msg(class_name: str, stamp: int, frame_id: str = 'camera', score: float = 1.0):
    """A rosbags vision_msgs/Classification with one hypothesis (the ground-truth label)."""
    ts = typestore()
    Hyp = ts.types[OBJECT_HYPOTHESIS]
    Cls = ts.types[CLASSIFICATION]
    return Cls(header=_header(stamp, frame_id), results=[Hyp(class_id=str(class_name), score=float(score))])


# -- writing ---------------------------------------------------------------------------------------------

def _storage_plugin(storage: str):
    from rosbags.rosbag2 import StoragePlugin

    if storage not in STORAGES:
        raise BagError(f'unknown bag storage {storage!r}; choose one of {", ".join(STORAGES)}')
    return StoragePlugin.SQLITE3 if storage == 'sqlite3' else StoragePlugin.MCAP


def write_bag(path: str | os.PathLike, frames: Sequence[np.ndarray] | np.ndarray,
              labels: Sequence[str] | None = None, fps: float = 30.0, storage: str = 'sqlite3',
              compressed: bool = False, image_topic: str | None = None,
              label_topic: str | None = DEFAULT_LABEL_TOPIC, start_stamp: int | None = None,
              encoding: str = 'rgb8', compressed_format: str = 'jpeg', jpeg_quality: int = 90,
              frame_id: str = 'camera', label_delay: float = 0.001, metadata: dict | None = None,
              overwrite: bool = False, progress: bool = False) -> Path:
    """Write RGB uint8 ``frames`` ([N,H,W,3] or a sequence of [H,W,3]) and their class-name ``labels``.

    Frame ``i`` gets header stamp ``start_stamp + i/fps`` (ns; default: now) and frame_id ``frame_id``;
    it is recorded at that time. Its label (same header stamp) is recorded ``label_delay`` seconds
    later, as a labeller downstream of the camera would be. ``labels=None`` or ``label_topic=None``
    writes images only. ``metadata`` (JSON-able) is stored in ``metadata.yaml`` custom_data together
    with the class names. Returns the bag directory.
    """
    from rosbags.rosbag2 import Writer

    path = Path(path)
    n = len(frames)
    if labels is not None and len(labels) != n:
        raise BagError(f'{n} frames but {len(labels)} labels')
    if fps <= 0:
        raise BagError(f'fps must be > 0, got {fps}')
    plugin = _storage_plugin(storage)
    if path.exists():
        if not overwrite:
            raise BagError(f'{path} exists already; remove it or choose another output path')
        if path.is_dir() and (path / 'metadata.yaml').is_file():
            shutil.rmtree(path)
        else:
            raise BagError(f'{path} exists and is not a rosbag2 bag directory; refusing to overwrite it')
    image_topic = image_topic or (DEFAULT_COMPRESSED_TOPIC if compressed else DEFAULT_IMAGE_TOPIC)
    with_labels = labels is not None and label_topic
    if with_labels and label_topic == image_topic:
        raise BagError('image and label topics must differ')
    start = int(start_stamp) if start_stamp is not None else (time.time_ns() // 1_000_000) * 1_000_000
    period = 1e9 / float(fps)
    delay = int(round(label_delay * 1e9))
    meta = dict(metadata or {})
    meta.setdefault('fps', float(fps))
    meta.setdefault('frames', n)
    if labels is not None:
        meta.setdefault('class_names', sorted({str(x) for x in labels}))
    ts = typestore()
    bar = _progress(n, progress, f'writing {path.name}')
    try:
        with Writer(path, version=9, storage_plugin=plugin) as writer:
            writer.set_custom_data(CUSTOM_KEY, json.dumps(meta))
            img_type = COMPRESSED_IMAGE if compressed else IMAGE
            img_conn = writer.add_connection(image_topic, img_type, typestore=ts)
            lab_conn = (writer.add_connection(label_topic, CLASSIFICATION, typestore=ts)
                        if with_labels else None)
            for i in range(n):
                frame = np.asarray(frames[i])
                if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
                    raise BagError(f'frame {i}: expected RGB uint8 [H,W,3], got {frame.dtype} {frame.shape}')
                stamp = start + int(round(i * period))
                if compressed:
                    msg = compressed_msg(frame, stamp, frame_id, compressed_format, jpeg_quality)
                else:
                    msg = image_msg(frame, stamp, frame_id, encoding)
                writer.write(img_conn, stamp, ts.serialize_cdr(msg, img_type))
                if lab_conn is not None:
                    lab = label_msg(labels[i], stamp, frame_id)
                    writer.write(lab_conn, stamp + delay, ts.serialize_cdr(lab, CLASSIFICATION))
                bar.update(1)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)  # never leave a half-written bag behind
        raise
    finally:
        bar.close()
    return path


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit='frame', leave=False)


# -- reading ---------------------------------------------------------------------------------------------

class BagMessage(NamedTuple):
    """One recorded message: unpacks as ``(topic, msgtype, timestamp_ns, rawdata)``; ``.msg`` decodes."""

    topic: str
    msgtype: str
    timestamp: int
    rawdata: bytes

    @property
    def msg(self):
        return deserialize(self.rawdata, self.msgtype)


@dataclass
class TopicInfo:
    msgtype: str
    count: int


@dataclass
class BagInfo:
    path: Path
    storage: str
    message_count: int
    start_ns: int
    end_ns: int
    topics: dict[str, TopicInfo] = field(default_factory=dict)
    custom: dict = field(default_factory=dict)  # our JSON metadata (class names, fps, shift...)

    @property
    def duration(self) -> float:
        return max(0, self.end_ns - self.start_ns) / 1e9

    def topics_of_type(self, *msgtypes: str) -> list[str]:
        return [t for t, i in self.topics.items() if i.msgtype in msgtypes]


def _storage_files(d: Path) -> list[Path]:
    return sorted(list(d.glob('*.db3')) + list(d.glob('*.mcap')))


def _describe_error(path: Path, e: BaseException, where: str) -> str:
    import sqlite3

    detail = ' '.join((str(e).strip() or type(e).__name__).split())
    low = detail.lower()
    if 'yaml' in low or 'metadata' in low:
        what = 'its metadata.yaml is invalid'
    elif isinstance(e, sqlite3.DatabaseError) or 'malformed' in low or 'database' in low:
        what = 'the sqlite3 storage (.db3) is truncated or corrupt'
    elif 'magic' in low or 'record' in low or 'chunk' in low or 'empty' in low:
        what = 'the mcap storage is truncated or corrupt (a cut-short .mcap has no valid footer)'
    else:
        what = 'the bag is truncated, corrupt or not a rosbag2 bag'
    return f'{path}: cannot read the bag {where}: {what} ({type(e).__name__}: {detail[:300]})'


def _check_path(path: Path) -> None:
    if not path.exists():
        raise BagError(f'bag not found: {path}')
    if path.is_dir() and not (path / 'metadata.yaml').is_file():
        files = _storage_files(path)
        hint = (f'; its storage file can be read directly: pass {files[0]} (or run `ros2 bag reindex {path}`)'
                if files else '')
        raise BagError(f'{path}: no metadata.yaml, so this is not a complete rosbag2 bag directory (the '
                       f'recording may have been interrupted){hint}')
    if path.is_file() and path.suffix not in ('.db3', '.mcap'):
        raise BagError(f'{path}: not a bag (expected a rosbag2 directory, a .db3 or a .mcap file)')


@contextmanager
def open_bag(path: str | os.PathLike):
    """Open a bag with ``rosbags.rosbag2.Reader``; every failure becomes a :class:`BagError`."""
    from rosbags.rosbag2 import Reader

    path = Path(path).expanduser()
    _check_path(path)
    try:
        reader = Reader(path)
        reader.open()
    except BagError:
        raise
    except Exception as e:
        raise BagError(_describe_error(path, e, 'when opening it')) from e
    try:
        _register_from_bag(reader.connections)
        yield reader
    finally:
        try:
            reader.close()
        except Exception:
            pass


def _storage_name(reader, path: Path) -> str:
    if path.is_file():
        return 'mcap' if path.suffix == '.mcap' else 'sqlite3'
    files = _storage_files(path)
    return 'mcap' if files and files[0].suffix == '.mcap' else 'sqlite3'


def bag_info(path: str | os.PathLike) -> BagInfo:
    """Topics, counts, time range, storage and our custom metadata of a bag (reads no messages)."""
    path = Path(path).expanduser()
    with open_bag(path) as reader:
        try:
            topics = {t: TopicInfo(i.msgtype or '', int(i.msgcount)) for t, i in reader.topics.items()}
            custom = {}
            meta = getattr(getattr(reader.storage, 'metadata', None), 'custom', None) or {}
            if CUSTOM_KEY in meta:
                try:
                    custom = json.loads(meta[CUSTOM_KEY])
                except ValueError:
                    custom = {}
            count = int(reader.message_count)
            start, end = (int(reader.start_time), int(reader.end_time)) if count else (0, 0)
        except BagError:
            raise
        except Exception as e:
            raise BagError(_describe_error(path, e, 'reading its index')) from e
        return BagInfo(path, _storage_name(reader, path), count, start, end, topics, custom)


def read_bag(path: str | os.PathLike, topics: Iterable[str] | None = None,
             start: int | None = None, stop: int | None = None) -> Iterator[BagMessage]:
    """Iterate :class:`BagMessage` ``(topic, msgtype, timestamp_ns, rawdata)`` in recording order.

    ``topics`` filters (unknown topic names raise BagError); ``start``/``stop`` are bag timestamps (ns).
    ``rawdata`` is the CDR-serialised message as ``bytes``; ``message.msg`` deserialises it.
    """
    path = Path(path).expanduser()
    with open_bag(path) as reader:
        conns = reader.connections
        if topics is not None:
            wanted = set(topics)
            missing = wanted - {c.topic for c in conns}
            if missing:
                raise BagError(f'{path}: no topic(s) {sorted(missing)} in the bag; it has '
                               f'{sorted({c.topic for c in conns})}')
            conns = [c for c in conns if c.topic in wanted]
            if not conns:
                return
        count = 0
        it = reader.messages(connections=conns, start=start, stop=stop)
        while True:
            try:
                conn, t, raw = next(it)
            except StopIteration:
                return
            except Exception as e:
                raise BagError(_describe_error(path, e, f'after {count} messages')) from e
            count += 1
            yield BagMessage(conn.topic, conn.msgtype, int(t), raw if isinstance(raw, bytes) else bytes(raw))


def read_messages(path: str | os.PathLike,
                  topics: Iterable[str] | None = None) -> Iterator[tuple[str, int, object]]:
    """Iterate ``(topic, timestamp_ns, deserialised message)``."""
    for m in read_bag(path, topics):
        yield m.topic, m.timestamp, m.msg


# -- frames and labels -----------------------------------------------------------------------------------

def decode_frame(msgtype: str, msg, want: str = 'rgb') -> np.ndarray:
    """An Image/CompressedImage message -> ``HxWx3`` uint8 in ``want`` order (a copy). Raises FrameError."""
    if msgtype == COMPRESSED_IMAGE:
        img, order = decode_compressed(msg.format, msg.data)
    elif msgtype == IMAGE:
        img, order = image_view(msg.encoding, msg.height, msg.width, msg.step, msg.is_bigendian, msg.data)
    else:
        raise FrameError('unsupported_type', f'{msgtype} is not an image message')
    out = to_order(img, order, want)
    return np.array(out) if out is img else out


def frame_view(msgtype: str, msg) -> tuple[np.ndarray, str]:
    """``(array, order)`` as the perception node sees it: a view for raw images, decoded for compressed."""
    if msgtype == COMPRESSED_IMAGE:
        return decode_compressed(msg.format, msg.data)
    if msgtype == IMAGE:
        return image_view(msg.encoding, msg.height, msg.width, msg.step, msg.is_bigendian, msg.data)
    raise FrameError('unsupported_type', f'{msgtype} is not an image message')


def label_of(msg) -> str | None:
    """Class name of a Classification label (results[0].class_id), or None if it has no results."""
    return str(msg.results[0].class_id) if len(msg.results) else None


def pick_image_topic(info: BagInfo, image_topic: str | None = None) -> str:
    """The image topic to use: ``image_topic`` (checked) or the bag's only image topic."""
    if image_topic is not None:
        if image_topic not in info.topics:
            raise BagError(f'{info.path}: no topic {image_topic!r}; the bag has {sorted(info.topics)}')
        if info.topics[image_topic].msgtype not in IMAGE_TYPES:
            raise BagError(f'{info.path}: {image_topic} is {info.topics[image_topic].msgtype}, not an image')
        return image_topic
    cands = info.topics_of_type(*IMAGE_TYPES)
    if not cands:
        raise BagError(f'{info.path}: no sensor_msgs/Image or CompressedImage topic; '
                       f'topics: {sorted(info.topics)}')
    if len(cands) > 1:
        raise BagError(f'{info.path}: several image topics {sorted(cands)}; '
                       'choose one (image_topic / --image-topic)')
    return cands[0]


def read_labels(path: str | os.PathLike, label_topic: str = DEFAULT_LABEL_TOPIC) -> dict[int, str]:
    """``{header stamp ns: class name}`` of every label in the bag."""
    labels = {}
    for m in read_bag(path, [label_topic]):
        if m.msgtype != CLASSIFICATION:
            raise BagError(f'{path}: {label_topic} carries {m.msgtype}, expected {CLASSIFICATION}')
        msg = m.msg
        name = label_of(msg)
        if name is not None:
            labels[stamp_ns(msg.header)] = name
    return labels


def read_labelled_frames(bag: str | os.PathLike, image_topic: str | None = None,
                         label_topic: str = DEFAULT_LABEL_TOPIC, max_frames: int | None = None,
                         return_stamps: bool = False):
    """``(images RGB [N,H,W,3] uint8, label names [N])`` of the frames that have a label.

    Frames and labels are paired by header stamp (not by arrival order). Compressed images are decoded.
    With ``return_stamps`` a third element, the frames' header stamps (ns, int64 [N]), is returned.
    """
    path = Path(bag).expanduser()
    info = bag_info(path)
    topic = pick_image_topic(info, image_topic)
    if label_topic not in info.topics:
        raise BagError(f'{path}: no label topic {label_topic!r}; the bag has {sorted(info.topics)}')
    labels = read_labels(path, label_topic)
    images, names, stamps = [], [], []
    for m in read_bag(path, [topic]):
        msg = m.msg
        s = stamp_ns(msg.header)
        if s not in labels:
            continue
        try:
            img = decode_frame(m.msgtype, msg, 'rgb')
        except FrameError as e:
            raise BagError(f'{path}: frame at stamp {s} on {topic} cannot be decoded: {e}') from e
        if images and img.shape != images[0].shape:
            raise BagError(f'{path}: frames have different sizes ({images[0].shape} and {img.shape})')
        images.append(img)
        names.append(labels[s])
        stamps.append(s)
        if max_frames is not None and len(images) >= max_frames:
            break
    arr = np.stack(images) if images else np.zeros((0, 0, 0, 3), np.uint8)
    if return_stamps:
        return arr, names, np.asarray(stamps, np.int64)
    return arr, names


def relabel_bag(src: str | os.PathLike, dst: str | os.PathLike, topics: Iterable[str], label_topic: str,
                mapping: dict, overwrite: bool = False) -> Path:
    """Copy ``topics`` of bag ``src`` to ``dst`` (mcap), the recorded bytes unchanged except the labels on
    ``label_topic``: each ``results[0].class_id`` through ``mapping`` (name -> new name, None = drop the
    label). A label missing from ``mapping`` raises BagError. Returns ``dst``."""
    from rosbags.rosbag2 import Writer

    src, dst = Path(src).expanduser(), Path(dst)
    info = bag_info(src)
    topics = list(dict.fromkeys(topics))
    if dst.exists():
        if not overwrite:
            raise BagError(f'{dst} exists already')
        shutil.rmtree(dst)
    ts = typestore()
    try:
        with Writer(dst, version=9, storage_plugin=_storage_plugin('mcap')) as writer:
            conns = {t: writer.add_connection(t, info.topics[t].msgtype, typestore=ts) for t in topics}
            for m in read_bag(src, topics):
                raw = m.rawdata
                if m.topic == label_topic:
                    msg = m.msg
                    name = label_of(msg)
                    if name is not None:
                        if name not in mapping:
                            raise BagError(f'{src}: label {name!r} is not in the class map')
                        if mapping[name] is None:
                            continue
                        msg.results[0].class_id = mapping[name]
                        raw = ts.serialize_cdr(msg, m.msgtype)
                writer.write(conns[m.topic], m.timestamp, raw)
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)
        raise
    return dst
