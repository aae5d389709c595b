"""Dataset loaders for training and evaluation (numpy + OpenCV; no torch, no torchvision).

``load_dataset(spec)`` dispatches on what ``spec`` is:

- a ``.npz`` file (or a folder holding ``gtsrb32.npz``) in the GTSRB npz layout: ``X_train``, ``y_train``,
  ``X_test``, ``y_test`` (uint8 RGB [N,H,W,3] / class ids) and ``class_names``;
- a folder in the official GTSRB layout (``Final_Training/Images/000NN/*.ppm`` + ``GT-000NN.csv``,
  ``;``-separated ``Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId``; test images with
  ``GT-final_test.csv``): the sign ROI is cropped and resized to ``image_size``;
- a folder in the torchvision ImageFolder layout (one sub-folder per class, or ``train/`` and ``test/``
  (or ``val/``) sub-folders each laid out that way), read with OpenCV;
- a rosbag2 (a folder with ``metadata.yaml``, a ``.mcap``/``.db3`` file, or ``bag:PATH``): frames of
  ``image_topic`` labelled by ``label_topic``, read by :func:`edge_tl_ros.bags.io.read_labelled_frames`.

Everything comes back as :class:`~edge_tl_ros.data.Split` (images [N,H,W,3] uint8 RGB, labels int64).
:func:`download_gtsrb` fetches and unpacks the official archives.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import GTSRB_NPZ, DataError, Split, default_data_path, load_gtsrb_npz

IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.ppm', '.pgm', '.bmp', '.tif', '.tiff', '.webp')

GTSRB_CLASS_NAMES = (
    'Speed limit (20km/h)',
    'Speed limit (30km/h)',
    'Speed limit (50km/h)',
    'Speed limit (60km/h)',
    'Speed limit (70km/h)',
    'Speed limit (80km/h)',
    'End of speed limit (80km/h)',
    'Speed limit (100km/h)',
    'Speed limit (120km/h)',
    'No passing',
    'No passing for vehicles over 3.5 metric tons',
    'Right-of-way at the next intersection',
    'Priority road',
    'Yield',
    'Stop',
    'No vehicles',
    'Vehicles over 3.5 metric tons prohibited',
    'No entry',
    'General caution',
    'Dangerous curve to the left',
    'Dangerous curve to the right',
    'Double curve',
    'Bumpy road',
    'Slippery road',
    'Road narrows on the right',
    'Road work',
    'Traffic signals',
    'Pedestrians',
    'Children crossing',
    'Bicycles crossing',
    'Beware of ice/snow',
    'Wild animals crossing',
    'End of all speed and passing limits',
    'Turn right ahead',
    'Turn left ahead',
    'Ahead only',
    'Go straight or right',
    'Go straight or left',
    'Keep right',
    'Keep left',
    'Roundabout mandatory',
    'End of no passing',
    'End of no passing by vehicles over 3.5 metric tons',
)

# The official archives (https://benchmark.ini.rub.de/gtsrb_dataset.html, hosted at sid.erda.dk).
GTSRB_BASE_URL = 'https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/'
GTSRB_URLS = (
    GTSRB_BASE_URL + 'GTSRB_Final_Training_Images.zip',
    GTSRB_BASE_URL + 'GTSRB_Final_Test_Images.zip',
    GTSRB_BASE_URL + 'GTSRB_Final_Test_GT.zip',
)


@dataclass
class Dataset:
    train: Split
    test: Split | None
    kind: str  # gtsrb-npz, gtsrb-folder, imagefolder, rosbag2
    source: str  # the path it was read from

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.train.class_names

    def describe(self) -> dict:
        d = {
            'kind': self.kind,
            'source': self.source,
            'num_classes': len(self.class_names),
            'train': len(self.train),
            'image_shape': list(self.train.images.shape[1:]),
        }
        if self.test is not None:
            d['test'] = len(self.test)
        return d


# -- dispatch ------------------------------------------------------------------------------------------------
def load_dataset(
    spec: str | os.PathLike | None = None,
    image_size: int = 32,
    image_topic: str = '/image',
    label_topic: str = '/labels',
    class_names: tuple[str, ...] | None = None,
    progress: bool = True,
) -> Dataset:
    """Load a dataset from a path (see the module docstring); ``None`` means :func:`default_data_path`."""
    spec = str(spec) if spec is not None else str(default_data_path())
    if spec.startswith('bag:'):
        return load_bag(spec[4:], image_topic, label_topic, image_size, class_names)
    p = Path(spec).expanduser()
    if not p.exists():
        raise DataError(
            f'data not found: {p} (set --data or $EDGE_TL_DATA; '
            '`edge-tl download-gtsrb --out DIR` fetches the official GTSRB archives)'
        )
    if p.is_file():
        if p.suffix == '.npz':
            return _npz_dataset(p)
        if p.suffix in ('.mcap', '.db3'):
            return load_bag(str(p), image_topic, label_topic, image_size, class_names)
        raise DataError(f'{p}: unsupported data file (expected .npz, or a rosbag2 .mcap/.db3)')
    if (p / 'metadata.yaml').is_file() or any(p.glob('*.mcap')) or any(p.glob('*.db3')):
        return load_bag(str(p), image_topic, label_topic, image_size, class_names)
    if (p / GTSRB_NPZ).is_file():
        return _npz_dataset(p / GTSRB_NPZ)
    if find_gtsrb_root(p) is not None:
        return load_gtsrb_folder(p, image_size, progress)
    if _is_imagefolder(p) or any(_is_imagefolder(p / s) for s in ('train', 'training')):
        return load_imagefolder(p, image_size, class_names, progress)
    npzs = sorted(p.glob('*.npz'))
    if len(npzs) == 1:
        return _npz_dataset(npzs[0])
    raise DataError(
        f'{p}: not a recognised dataset (GTSRB npz, official GTSRB folder, ImageFolder '
        'class-per-folder layout, or rosbag2)'
    )


def _npz_dataset(path: Path) -> Dataset:
    with np.load(path, allow_pickle=False) as z:
        missing = {'X_train', 'y_train', 'class_names'} - set(z.files)
        if missing:
            raise DataError(f'{path}: npz lacks {sorted(missing)} (expected the gtsrb32.npz layout)')
    train, test = load_gtsrb_npz(path) if _has_test(path) else (_npz_train_only(path), None)
    return Dataset(train, test, 'gtsrb-npz', str(path))


def _has_test(path: Path) -> bool:
    with np.load(path, allow_pickle=False) as z:
        return 'X_test' in z.files and 'y_test' in z.files


def _npz_train_only(path: Path) -> Split:
    with np.load(path, allow_pickle=False) as z:
        return Split(z['X_train'], z['y_train'].astype(np.int64), tuple(str(s) for s in z['class_names']))


def save_npz(ds: Dataset, path: str | os.PathLike) -> Path:
    """Write a dataset in the gtsrb32.npz layout (so it loads fast next time)."""
    from ..atomic import atomic_write_bytes, npz_bytes

    arrays = {
        'X_train': ds.train.images,
        'y_train': ds.train.labels,
        'class_names': np.array(ds.class_names, dtype=np.str_),
    }
    if ds.test is not None:
        arrays.update(X_test=ds.test.images, y_test=ds.test.labels)
    return atomic_write_bytes(path, npz_bytes(**arrays))


# -- image helpers -------------------------------------------------------------------------------------------
def read_rgb(path: str | os.PathLike) -> np.ndarray:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f'{path}: OpenCV cannot read this image')
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """Square resize with the rule the engine uses at inference (:func:`edge_tl_ros.imaging.resize_to`)."""
    from ..imaging import resize_to

    return resize_to(img, size, size)


def _crop_roi(img: np.ndarray, x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    h, w = img.shape[:2]
    x1, y1 = max(0, min(x1, w - 1)), max(0, min(y1, h - 1))
    x2, y2 = max(x1 + 1, min(x2 + 1, w)), max(y1 + 1, min(y2 + 1, h))  # GTSRB ROI corners are inclusive
    return img[y1:y2, x1:x2]


def _progress(it, total: int, desc: str, enabled: bool):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, unit='img', mininterval=1.0, leave=False)


# -- official GTSRB folder layout ----------------------------------------------------------------------------
def find_gtsrb_root(p: Path, max_depth: int = 3) -> Path | None:
    """The folder that holds ``Final_Training/Images`` (searching a few levels down), or None."""
    frontier = [p]
    for _ in range(max_depth + 1):
        nxt = []
        for d in frontier:
            if (d / 'Final_Training' / 'Images').is_dir():
                return d
            nxt += [c for c in sorted(d.iterdir()) if c.is_dir() and not c.name.startswith('.')]
        frontier = nxt
    return None


def _read_gt_csv(path: Path) -> list[dict]:
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f, delimiter=';'))
    need = {'Filename', 'Roi.X1', 'Roi.Y1', 'Roi.X2', 'Roi.Y2'}
    if rows and not need <= set(rows[0]):
        raise DataError(f'{path}: expected columns {sorted(need)} (+ ClassId), got {list(rows[0])}')
    return rows


def _load_gt_rows(
    rows: list[dict], folder: Path, image_size: int, desc: str, progress: bool, class_id: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    imgs, labels = [], []
    for r in _progress(rows, len(rows), desc, progress):
        img = read_rgb(folder / r['Filename'])
        img = _crop_roi(img, int(r['Roi.X1']), int(r['Roi.Y1']), int(r['Roi.X2']), int(r['Roi.Y2']))
        imgs.append(resize(img, image_size))
        labels.append(int(r['ClassId']) if class_id is None else class_id)
    shape = (0, image_size, image_size, 3)
    return (np.stack(imgs) if imgs else np.zeros(shape, np.uint8)), np.asarray(labels, np.int64)


def load_gtsrb_folder(root: str | os.PathLike, image_size: int = 32, progress: bool = True) -> Dataset:
    """The official GTSRB layout under ``root`` (ROI cropped, resized to ``image_size``)."""
    root = Path(root)
    found = find_gtsrb_root(root)
    if found is None:
        raise DataError(f'{root}: no Final_Training/Images folder (official GTSRB layout)')
    train_dir = found / 'Final_Training' / 'Images'
    class_dirs = sorted(d for d in train_dir.iterdir() if d.is_dir() and d.name.isdigit())
    if not class_dirs:
        raise DataError(f'{train_dir}: no class folders 000NN')
    X, y = [], []
    for d in class_dirs:
        cid = int(d.name)
        csvs = sorted(d.glob('GT-*.csv'))
        if not csvs:
            raise DataError(f'{d}: no GT-{d.name}.csv annotation file')
        rows = _read_gt_csv(csvs[0])
        xi, yi = _load_gt_rows(rows, d, image_size, f'GTSRB train {d.name}', progress, class_id=cid)
        X.append(xi)
        y.append(yi)
    n_cls = max(int(d.name) for d in class_dirs) + 1
    names = GTSRB_CLASS_NAMES if n_cls <= len(GTSRB_CLASS_NAMES) and n_cls > 40 else None
    names = names[:n_cls] if names else tuple(f'class_{i:05d}' for i in range(n_cls))
    train = Split(np.concatenate(X), np.concatenate(y), names)
    test = None
    # GT-final_test.csv (with ClassId) comes in its own archive, unpacked beside the GTSRB/ folder
    gt = sorted(root.rglob('GT-final_test.csv')) or sorted(found.parent.glob('GT-final_test.csv'))
    if gt:
        rows = _read_gt_csv(gt[0])
        if rows and 'ClassId' not in rows[0]:
            raise DataError(f'{gt[0]}: no ClassId column')
        img_dir = _find_image_dir(root, rows[0]['Filename']) if rows else gt[0].parent
        xt, yt = _load_gt_rows(rows, img_dir, image_size, 'GTSRB test', progress)
        test = Split(xt, yt, names)
    return Dataset(train, test, 'gtsrb-folder', str(found))


def _find_image_dir(root: Path, filename: str) -> Path:
    for cand in (root / 'GTSRB' / 'Final_Test' / 'Images', root / 'Final_Test' / 'Images'):
        if (cand / filename).is_file():
            return cand
    hits = sorted(p for p in root.rglob(filename) if 'Final_Training' not in p.parts)
    if not hits:
        raise DataError(f'{root}: GT-final_test.csv lists {filename} but no such test image was found')
    return hits[0].parent


# -- ImageFolder layout --------------------------------------------------------------------------------------
def _images_in(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _is_imagefolder(p: Path) -> bool:
    if not p.is_dir():
        return False
    subs = [d for d in p.iterdir() if d.is_dir() and not d.name.startswith('.')]
    return bool(subs) and any(_images_in(d) for d in subs)


def _read_imagefolder(p: Path, image_size: int, class_names: tuple[str, ...] | None, progress: bool) -> Split:
    subs = sorted(d.name for d in p.iterdir() if d.is_dir() and not d.name.startswith('.'))
    names = tuple(class_names) if class_names else tuple(subs)
    unknown = sorted(set(subs) - set(names))
    if unknown:
        raise DataError(f'{p}: class folders {unknown[:5]} are not among the {len(names)} class names')
    files = [(f, names.index(c)) for c in subs for f in _images_in(p / c)]
    imgs = [resize(read_rgb(f), image_size) for f, _ in _progress(files, len(files), p.name, progress)]
    X = np.stack(imgs) if imgs else np.zeros((0, image_size, image_size, 3), np.uint8)
    return Split(X, np.asarray([c for _, c in files], np.int64), names)


def load_imagefolder(
    root: str | os.PathLike,
    image_size: int = 32,
    class_names: tuple[str, ...] | None = None,
    progress: bool = True,
) -> Dataset:
    """Class-per-folder images; ``train/`` + ``test/`` (or ``val/``) sub-folders give both splits."""
    root = Path(root)
    train_dir = next((root / s for s in ('train', 'training') if _is_imagefolder(root / s)), None)
    if train_dir is None:
        return Dataset(
            _read_imagefolder(root, image_size, class_names, progress), None, 'imagefolder', str(root)
        )
    train = _read_imagefolder(train_dir, image_size, class_names, progress)
    test_dir = next((root / s for s in ('test', 'val', 'validation') if _is_imagefolder(root / s)), None)
    test = _read_imagefolder(test_dir, image_size, train.class_names, progress) if test_dir else None
    return Dataset(train, test, 'imagefolder', str(root))


# -- rosbag2 -------------------------------------------------------------------------------------------------
def load_bag(
    path: str,
    image_topic: str = '/image',
    label_topic: str = '/labels',
    image_size: int = 32,
    class_names: tuple[str, ...] | None = None,
) -> Dataset:
    """Labelled frames from a rosbag2 (labels are class names on ``label_topic``)."""
    try:
        from ..bags.io import read_labelled_frames
    except ImportError as e:
        raise DataError(f'reading a rosbag2 needs edge_tl_ros.bags.io and the rosbags package ({e})') from e
    images, label_names = read_labelled_frames(path, image_topic, label_topic)
    label_names = [str(s) for s in label_names]
    if class_names is None:
        class_names = (
            GTSRB_CLASS_NAMES
            if set(label_names) <= set(GTSRB_CLASS_NAMES)
            else tuple(sorted(set(label_names)))
        )
    unknown = sorted(set(label_names) - set(class_names))
    if unknown:
        raise DataError(f'{path}: labels {unknown[:5]} are not among the {len(class_names)} class names')
    index = {c: i for i, c in enumerate(class_names)}
    X = (
        np.stack([resize(np.asarray(im), image_size) for im in images])
        if len(images)
        else np.zeros((0, image_size, image_size, 3), np.uint8)
    )
    y = np.asarray([index[c] for c in label_names], np.int64)
    return Dataset(Split(X, y, tuple(class_names)), None, 'rosbag2', str(path))


# -- download ------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def download_file(url: str, dest: Path, progress: bool = True, timeout: float = 60.0) -> Path:
    """Stream ``url`` to ``dest`` (via ``dest.part``, renamed when complete) with a progress bar."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + '.part')
    req = urllib.request.Request(url, headers={'User-Agent': 'edge-tl'})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp, open(part, 'wb') as out:
            total = resp.headers.get('Content-Length')
            total = int(total) if total and total.isdigit() else None
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(
                    total=total,
                    desc=dest.name,
                    unit='B',
                    unit_scale=True,
                    unit_divisor=1024,
                    mininterval=0.5,
                    leave=False,
                )
            got = 0
            for chunk in iter(lambda: resp.read(1 << 20), b''):
                out.write(chunk)
                got += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
            if bar is not None:
                bar.close()
        if total is not None and got != total:
            raise DataError(f'{url}: download truncated ({got} of {total} bytes)')
    except DataError:
        part.unlink(missing_ok=True)
        raise
    except OSError as e:  # URLError, HTTPError, timeouts, disk errors
        part.unlink(missing_ok=True)
        raise DataError(f'{url}: download failed: {e}') from e
    os.replace(part, dest)
    return dest


def safe_extract(zip_path: Path, out: Path) -> list[str]:
    """Extract a zip archive into ``out``, refusing members that would land outside it."""
    out = out.resolve()
    try:
        with zipfile.ZipFile(zip_path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise DataError(f'{zip_path}: corrupt member {bad}')
            for m in zf.infolist():
                target = (out / m.filename).resolve()
                if out != target and out not in target.parents:
                    raise DataError(f'{zip_path}: member {m.filename!r} escapes the output folder')
            zf.extractall(out)
            return zf.namelist()
    except zipfile.BadZipFile as e:
        raise DataError(f'{zip_path}: not a zip archive ({e})') from e


def download_gtsrb(
    out: str | os.PathLike,
    urls: list[str] | tuple[str, ...] = GTSRB_URLS,
    sha256: dict[str, str] | None = None,
    keep_archives: bool = False,
    progress: bool = True,
) -> Path:
    """Download the official GTSRB archives (or ``urls``) into ``out`` and unpack them.

    ``sha256`` optionally maps archive file names to expected digests. Returns ``out``; afterwards
    ``load_dataset(out)`` reads it (official folder layout).
    """
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for url in urls:
        name = Path(urllib.request.url2pathname(url.split('?')[0].rstrip('/').rsplit('/', 1)[-1])).name
        dest = out / 'archives' / (name or 'archive.zip')
        if not dest.is_file():
            download_file(url, dest, progress)
        if sha256 and name in sha256:
            got = _sha256(dest)
            if got != sha256[name]:
                dest.unlink()
                raise DataError(
                    f'{name}: sha256 {got[:16]}... does not match the expected '
                    f'{sha256[name][:16]}...; the download is corrupt (deleted, run again)'
                )
        safe_extract(dest, out)
    if not keep_archives:
        shutil.rmtree(out / 'archives', ignore_errors=True)
    if find_gtsrb_root(out) is None:
        raise DataError(f'{out}: the archives did not contain Final_Training/Images (official GTSRB layout)')
    return out


# -- splits for training -------------------------------------------------------------------------------------
@dataclass
class TrainingData:
    train: Split  # what the model is fitted on
    val: Split  # held-out tracks of the training split (model selection, int8 decision)
    test: Split | None  # the official test split (reported accuracy)
    full_train: Split  # train + val (anchor sets, calibration)
    desc: dict


def training_data(
    spec=None, image_size: int = 32, val_fraction: float = 0.1, seed: int = 0, **kwargs
) -> TrainingData:
    """Load ``spec`` and hold out ``val_fraction`` of the training *tracks* (:func:`data.track_split`)."""
    from ..data import track_split

    ds = load_dataset(spec, image_size=image_size, **kwargs)
    if val_fraction > 0:
        tr, va = track_split(ds.train.labels, val_fraction, seed=seed)
    else:
        tr, va = np.arange(len(ds.train)), np.zeros(0, np.int64)
    desc = ds.describe()
    desc['val'] = {
        'how': f'track_split(val_fraction={val_fraction}, track_len=30, seed={seed}) of the training split',
        'n': int(len(va)),
    }
    desc['fit_n'] = int(len(tr))
    return TrainingData(ds.train.subset(tr), ds.train.subset(va), ds.test, ds.train, desc)
