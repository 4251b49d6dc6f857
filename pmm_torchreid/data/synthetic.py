"""An embedded, deterministic synthetic person re-identification dataset.

It is drawn on first use (numpy + PIL, fixed seed, no download) under
``<root>/pmm_synthetic/`` and registered with torchreid as ``pmm_synthetic``::

    <root>/pmm_synthetic/{train,query,gallery}/PPPP_cC_NN.png   # pid, camera (1-based), shot
    <root>/pmm_synthetic/COMPLETE.json                            # format version + sizes
    <root>/pmm_synthetic_parts/{train,query,gallery}/PPPP_cC_NN.png  # part masks (on demand)

Each identity is a unique combination of local cues (hair, shirt, trousers or
shorts, shoes, logo on the shirt, bag), each cue being shared by many identities.
The cameras change light, colour cast, background, position and scale; images
get noise and ~20% of them an occluder.

Generation happens in a temporary sibling folder that is renamed into place only
when complete, under an ``fcntl.flock`` on ``<root>/.pmm_synthetic.lock``, so
several processes may ask for it at once.  A folder ``pmm_synthetic`` without
the completion marker, or with a marker of another format version or size, is
never used nor deleted: an error asks the user to delete it (we do not
regenerate old versions in place, so no folder is ever deleted behind a reader).

**Part masks.**  The generator draws every body part, so it knows them
exactly: :func:`prepare_parts` (called when a model needs semantic regions,
e.g. MagnifierNet) redraws each image with the same random draws and writes a
label PNG of the same size into a sibling folder ``<dataset_dir>_parts``,
mirroring the image tree (the layout :mod:`pmm_torchreid.data.parsing` reads for
real datasets).  The labels are LIP's (:data:`PART_LABELS`), the label set
common human parsers write; the images themselves are not touched (they stay
byte-identical, and the dataset folder gains no file).
"""
from __future__ import annotations

import glob
import json
import os
import os.path as osp
import re
import shutil
import tempfile
import time
from typing import Dict, List, Tuple

import numpy as np
import torchreid
from PIL import Image, ImageDraw

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock, rename still atomic
    fcntl = None

__all__ = ['SyntheticPersons', 'DATASETS', 'prepare', 'generate', 'FORMAT_VERSION',
           'PART_LABELS', 'PARTS_VERSION', 'prepare_parts', 'generate_parts',
           'parts_folder', 'is_synthetic_dataset']

FORMAT_VERSION = 1
#: version of the part masks (``<dataset_dir>_parts/COMPLETE.json``)
PARTS_VERSION = 1
PARTS_SUFFIX = '_parts'
SEED = 20210606
HEIGHT, WIDTH = 128, 64
MARKER = 'COMPLETE.json'
_NAME = re.compile(r'^(\d+)_c(\d+)_(\d+)\.png$')

HAIR = [(25, 20, 18), (85, 52, 30), (205, 175, 95), (160, 160, 160), (150, 60, 30)]
SHIRT = [(230, 230, 225), (35, 35, 40), (190, 40, 40), (40, 50, 115),
         (115, 165, 215), (60, 135, 70), (225, 195, 55), (130, 130, 130)]
LEGS = [(60, 80, 135), (30, 30, 35), (195, 175, 135), (110, 110, 118),
        (105, 70, 45), (220, 220, 215), (100, 110, 60)]
SHOES = [(20, 20, 20), (235, 235, 235), (150, 35, 30)]
MARK = [(245, 135, 30), (205, 50, 175), (40, 205, 205), (150, 230, 60)]  # none in SHIRT
BAG = [(125, 78, 40), (28, 28, 30), (225, 105, 145)]
SKIN = [(235, 195, 165), (200, 150, 110), (130, 90, 60)]
#: The label ids of the part masks: a subset of LIP's 20 labels (Gong et al.,
#: CVPR 2017; CIHP uses the same ids), so that the masks read like a human
#: parser's output.  The figures face the camera: the arm, leg and shoe on
#: the image's left are the person's right.  The neck counts as face; the bag,
#: its strap and the occluders are background (LIP has no bag label).
PART_LABELS = {'background': 0, 'hair': 2, 'upper_clothes': 5, 'pants': 9,
               'face': 13, 'left_arm': 14, 'right_arm': 15, 'left_leg': 16,
               'right_leg': 17, 'left_shoe': 18, 'right_shoe': 19}
_SIDE = {-1: 'right', 1: 'left'}  # image side -> the person's side
# cue -> number of values (skin: face and arms); logo: none + 3 shapes x 4
# colours, bag: none + 2 kinds x 3 colours
_CUES = {'skin': 3, 'hair': 5, 'shirt': 8, 'legs': 7, 'shorts': 2, 'shoes': 3, 'logo': 13, 'bag': 7}
# background kind, wall, floor, horizon, gain (rgb), scale, x shift, feet y, noise, resolution
_CAMS = [
    ('wall', (150, 150, 140), (105, 100, 95), 0.55, (1.0, 1.0, 1.0), 0.86, 0, 0.97, 4, 1.0),
    ('stripes', (175, 145, 105), (120, 100, 80), 0.62, (1.18, 1.0, 0.75), 0.76, -6, 0.93, 6, 0.7),
    ('gradient', (90, 110, 130), (60, 65, 70), 0.70, (0.62, 0.72, 0.95), 0.94, 5, 0.995, 9, 1.0),
    ('tiles', (200, 205, 190), (140, 150, 120), 0.50, (1.12, 1.3, 1.02), 0.80, 3, 0.95, 5, 0.5),
]


def _identities(n: int, seed: int) -> List[Dict[str, int]]:
    """Draws ``n`` distinct cue combinations from the product space."""
    sizes = list(_CUES.values())
    codes = np.random.default_rng([seed, 0]).choice(int(np.prod(sizes)), n, replace=False)
    out = []
    for code in codes.tolist():
        ident = {}
        for name, size in _CUES.items():
            code, ident[name] = divmod(code, size)
        out.append(ident)
    return out


def _background(cam: tuple, rng: np.random.Generator) -> np.ndarray:
    kind, wall, floor, horizon = cam[:4]
    h, w = 2 * HEIGHT, 2 * WIDTH
    wall = np.clip(np.array(wall) + rng.integers(-12, 13, 3), 0, 255)
    floor = np.clip(np.array(floor) + rng.integers(-12, 13, 3), 0, 255)
    y0 = int((horizon + rng.uniform(-0.03, 0.03)) * h)
    bg = np.empty((h, w, 3), np.float32)
    bg[:y0], bg[y0:] = wall, floor
    ys, xs = np.mgrid[0:h, 0:w]
    if kind == 'stripes':  # facade with pillars
        bg[:y0][(xs[:y0] + int(rng.integers(0, 24))) % 24 < 7] *= 0.7
    elif kind == 'gradient':  # dusky sky to street
        bg[:y0] *= (0.6 + 0.6 * ys[:y0, :, None] / y0)
    elif kind == 'tiles':  # chequered pavement
        bg[y0:][((xs[y0:] // 16) + (ys[y0:] // 12)) % 2 == 0] *= 0.8
    else:  # plain wall with a skirting line
        bg[y0 - 4:y0] *= 0.5
    return bg


def _person(draw: ImageDraw.ImageDraw, ident: Dict[str, int], rng: np.random.Generator,
            cx: float, feet: float, h: float, parts: ImageDraw.ImageDraw = None) -> None:
    """Draws the figure; with ``parts``, every shape also goes onto that
    label canvas (same geometry, LIP label ids as the fill)."""
    top = feet - h
    L = PART_LABELS

    def P(x: float, y: float) -> Tuple[float, float]:
        return cx + x * h, top + y * h

    def box(x0: float, y0: float, x1: float, y1: float) -> list:
        return [P(x0, y0), P(x1, y1)]

    def paint(shape: str, xy, *args, fill, label: int, **kwargs) -> None:
        getattr(draw, shape)(xy, *args, fill=fill, **kwargs)
        if parts is not None:
            getattr(parts, shape)(xy, *args, fill=label, **kwargs)

    skin = SKIN[ident['skin']]
    shirt, legs = SHIRT[ident['shirt']], LEGS[ident['legs']]
    swing, stride = rng.uniform(-0.04, 0.04), rng.uniform(-0.07, 0.07)
    for s in (-1, 1):  # arms: sleeve then forearm
        sx, hx = 0.125 * s, (0.15 + swing) * s
        elbow = (sx + 0.35 * (hx - sx), 0.32)
        paint('line', [P(sx, 0.18), P(*elbow)], fill=shirt, width=max(1, int(0.06 * h)),
              label=L['upper_clothes'])
        paint('line', [P(*elbow), P(hx, 0.49)], fill=skin, width=max(1, int(0.05 * h)),
              label=L[_SIDE[s] + '_arm'])
    for s in (-1, 1):  # legs, trousers or shorts, shoes
        hip, ank = 0.055 * s, 0.05 * s + stride * s
        knee = 0.66 if ident['shorts'] else 0.95
        paint('polygon', [P(hip - 0.05, 0.5), P(hip + 0.05, 0.5), P(ank + 0.045, 0.94),
                          P(ank - 0.045, 0.94)], fill=skin, label=L[_SIDE[s] + '_leg'])
        k = (knee - 0.5) / 0.44
        paint('polygon', [P(hip - 0.05, 0.5), P(hip + 0.05, 0.5),
                          P(hip + 0.05 + k * (ank - hip - 0.005), knee),
                          P(hip - 0.05 + k * (ank - hip + 0.005), knee)], fill=legs,
              label=L['pants'])
        paint('ellipse', box(ank - 0.06 + 0.01 * s, 0.925, ank + 0.06 + 0.01 * s, 1.0),
              fill=SHOES[ident['shoes']], label=L[_SIDE[s] + '_shoe'])
    paint('polygon', [P(-0.13, 0.16), P(0.13, 0.16), P(0.11, 0.53), P(-0.11, 0.53)], fill=shirt,
          label=L['upper_clothes'])
    if ident['logo']:
        shape, colour = divmod(ident['logo'] - 1, 4)
        fill = MARK[colour]
        if shape == 0:
            paint('rectangle', box(-0.045, 0.24, 0.045, 0.33), fill=fill,
                  label=L['upper_clothes'])
        elif shape == 1:
            paint('rectangle', box(-0.123, 0.29, 0.123, 0.35), fill=fill,
                  label=L['upper_clothes'])
        else:
            paint('ellipse', box(-0.05, 0.23, 0.05, 0.33), fill=fill, label=L['upper_clothes'])
    paint('rectangle', box(-0.025, 0.12, 0.025, 0.17), fill=skin, label=L['face'])
    paint('ellipse', box(-0.05, 0.025, 0.05, 0.14), fill=skin, label=L['face'])
    paint('chord', box(-0.057, 0.0, 0.057, 0.13), 180, 360, fill=HAIR[ident['hair']],
          label=L['hair'])
    if ident['bag']:
        kind, colour = divmod(ident['bag'] - 1, 3)
        s = 1 if rng.random() < 0.5 else -1
        x0, x1 = sorted((0.11 * s, (0.2 if kind == 0 else 0.23) * s))
        y0, y1 = (0.41, 0.55) if kind == 0 else (0.2, 0.5)
        paint('line', [P(-0.08 * s, 0.165), P((x0 + x1) / 2, y0)], fill=BAG[colour],
              width=max(1, int(0.015 * h)), label=L['background'])
        paint('rectangle', box(x0, y0, x1, y1), fill=BAG[colour], label=L['background'])


def _render(ident: Dict[str, int], cam: tuple, rng: np.random.Generator,
            with_parts: bool = False):
    """The image; with ``with_parts``, ``(image, part mask)``: the same draws
    (the image is byte-identical) and an ``L`` image of :data:`PART_LABELS`
    ids, resized with nearest-neighbour sampling."""
    gain, scale, dx, feet, noise, res = cam[4:]
    img = Image.fromarray(_background(cam, rng).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    mask = Image.new('L', img.size, PART_LABELS['background']) if with_parts else None
    parts = ImageDraw.Draw(mask) if with_parts else None
    h = 2 * HEIGHT * scale * rng.uniform(0.95, 1.05)
    cx = WIDTH + 2 * (dx + rng.uniform(-4, 4))
    _person(draw, ident, rng, cx, 2 * HEIGHT * feet + rng.uniform(-5, 5), h, parts)
    if rng.random() < 0.2:  # clutter: a pole, a box in front of the legs, or a side panel
        c = tuple(int(v) for v in rng.integers(30, 220, 3))
        kind, W, H = int(rng.integers(0, 3)), 2 * WIDTH, 2 * HEIGHT
        if kind == 0:
            x = cx + rng.uniform(-0.12, 0.12) * h
            rect = [x - rng.uniform(5, 9), 0, x + rng.uniform(5, 9), H]
        elif kind == 1:
            rect = [rng.uniform(-20, 20), H * rng.uniform(0.58, 0.75),
                    W - rng.uniform(-20, 20), H]
        else:
            x = W * rng.uniform(0.3, 0.45)
            rect = [0, 0, x, H] if rng.random() < 0.5 else [W - x, 0, W, H]
        draw.rectangle(rect, fill=c)
        if parts is not None:  # the occluder hides what is behind it
            parts.rectangle(rect, fill=PART_LABELS['background'])
    img = img.resize((WIDTH, HEIGHT), Image.LANCZOS)
    if res < 1:
        img = img.resize((int(WIDTH * res), int(HEIGHT * res)), Image.BILINEAR)
        img = img.resize((WIDTH, HEIGHT), Image.BILINEAR)
    arr = np.asarray(img, np.float32) * np.array(gain) * rng.uniform(0.93, 1.07, 3)
    arr += rng.normal(0, noise, arr.shape)
    img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
    if not with_parts:
        return img
    return img, mask.resize((WIDTH, HEIGHT), Image.NEAREST)


def _plan(config: Dict[str, int]):
    """``(ident, cam, rng, split, name)`` of every image, in drawing order."""
    n_train, n_cams = config['num_train_ids'], config['num_cams']
    idents = _identities(n_train + config['num_test_ids'], config['seed'])
    for i, ident in enumerate(idents):
        pid = i + 1
        for c in range(n_cams):
            cam = _CAMS[c % len(_CAMS)]
            for k in range(config['imgs_per_cam']):
                rng = np.random.default_rng([config['seed'], 1, pid, c, k])
                split = 'train' if i < n_train else ('query' if k == 0 else 'gallery')
                name = '{:04d}_c{}_{:02d}.png'.format(pid, c + 1, k)
                yield ident, cam, rng, split, name


def generate(dest: str, config: Dict[str, int]) -> None:
    """Draws the whole dataset into the (new) folder ``dest``, marker last.

    Args:
        dest (str): folder to create.
        config (dict): ``num_train_ids``, ``num_test_ids``, ``num_cams``,
            ``imgs_per_cam`` and ``seed``.
    """
    for split in ('train', 'query', 'gallery'):
        os.makedirs(osp.join(dest, split))
    for ident, cam, rng, split, name in _plan(config):
        _render(ident, cam, rng).save(osp.join(dest, split, name), format='PNG')
    with open(osp.join(dest, MARKER), 'w') as f:
        json.dump(dict(config, format='pmm_synthetic', version=FORMAT_VERSION), f)


def _marker(folder: str):
    """The completion marker a generator wrote into ``folder`` (None if it is
    missing or unreadable)."""
    try:
        with open(osp.join(folder, MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _check(folder: str, config: Dict[str, int]) -> bool:
    """True if ``folder`` holds our complete dataset; False if absent; raises otherwise."""
    if not osp.exists(folder):
        return False
    if _marker(folder) != dict(config, format='pmm_synthetic',
                               version=FORMAT_VERSION):
        raise RuntimeError(
            '"{}" exists but is not a complete synthetic dataset of format version {} '
            'with these sizes (missing or different {}); it may be a half-written '
            'or an older dataset. Delete that folder and it will be generated '
            'again.'.format(folder, FORMAT_VERSION, MARKER))
    return True


def prepare(root: str, name: str, config: Dict[str, int]) -> str:
    """Returns ``<root>/<name>``, generating it first (once, safely) if absent.

    Args:
        root (str): root path of the datasets.
        name (str): folder name under ``root``.
        config (dict): sizes and seed, see :func:`generate`.
    """
    os.makedirs(root, exist_ok=True)
    folder = osp.join(root, name)
    if _check(folder, config):
        return folder
    n = (config['num_train_ids'] + config['num_test_ids']) * config['num_cams'] \
        * config['imgs_per_cam']
    return _make_once(
        folder, lambda: _check(folder, config),
        lambda dest: generate(dest, config),
        'Generating the synthetic dataset under "{}" (one-off, ~{:.0f} s)'.format(
            folder, max(1, n * 0.006)))


def _make_once(folder: str, ready, make, message: str) -> str:
    """Makes ``folder`` once, safely: under a file lock, into a temporary
    folder renamed into place (``make(dest)`` writes it); ``ready()`` says
    whether a complete one is there (another process may have made it)."""
    root, name = osp.split(folder)
    with open(osp.join(root, '.{}.lock'.format(name)), 'a') as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
            for stale in glob.glob(osp.join(root, '.{}.tmp-*'.format(name))):
                shutil.rmtree(stale, ignore_errors=True)  # only the lock holder writes
        if ready():  # another process made it while we waited
            return folder
        print(message, flush=True)
        tmp = tempfile.mkdtemp(prefix='.{}.tmp-{}-'.format(name, os.getpid()), dir=root)
        try:
            start = time.time()
            make(osp.join(tmp, name))
            os.rename(osp.join(tmp, name), folder)
        except OSError:
            if not ready():  # only a rival's finished folder is fine
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print('Done in {:.1f} s'.format(time.time() - start), flush=True)
    return folder


def parts_folder(dataset_dir: str) -> str:
    """Where the part masks of the dataset in ``dataset_dir`` go: the sibling
    folder ``<dataset_dir>_parts`` (same ``train/query/gallery`` tree)."""
    return osp.normpath(dataset_dir) + PARTS_SUFFIX


def _dataset_marker(dataset_dir: str) -> Dict:
    try:
        with open(osp.join(dataset_dir, MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        marker = None
    if not isinstance(marker, dict) or marker.get('format') != 'pmm_synthetic' \
            or marker.get('version') != FORMAT_VERSION:
        raise RuntimeError(
            '"{}" is not a complete synthetic dataset of format version {} (its {} is '
            'missing or different); no part masks can be drawn for it'.format(
                dataset_dir, FORMAT_VERSION, MARKER))
    return {k: marker[k] for k in ('num_train_ids', 'num_test_ids', 'num_cams',
                                   'imgs_per_cam', 'seed')}


def _parts_marker(config: Dict[str, int]) -> Dict:
    return dict(config, format='pmm_synthetic_parts', version=PARTS_VERSION,
                labels='lip')


def generate_parts(dest: str, config: Dict[str, int], dataset_dir: str = '',
                   verify: int = 3) -> None:
    """Draws the part masks of the dataset of ``config`` into the (new)
    folder ``dest``, marker last.

    With ``dataset_dir``, the first ``verify`` images are redrawn and compared
    with the files there first: masks of a dataset drawn by another version of
    the generator would not fit its images.

    Raises:
        RuntimeError: a redrawn image differs from the file.
    """
    for split in ('train', 'query', 'gallery'):
        os.makedirs(osp.join(dest, split))
    for n, (ident, cam, rng, split, name) in enumerate(_plan(config)):
        img, mask = _render(ident, cam, rng, True)
        if dataset_dir and n < verify:
            path = osp.join(dataset_dir, split, name)
            with Image.open(path) as disk:
                same = np.array_equal(np.asarray(disk.convert('RGB')), np.asarray(img))
            if not same:
                raise RuntimeError(
                    '"{}" differs from what this generator draws for it: the dataset '
                    'was drawn by another version, so no part masks can be drawn for '
                    'it. Delete "{}" and it will be generated again.'.format(
                        path, dataset_dir))
        mask.save(osp.join(dest, split, name), format='PNG')
    with open(osp.join(dest, MARKER), 'w') as f:
        json.dump(_parts_marker(config), f)


def _parts_ready(folder: str, config: Dict[str, int]) -> bool:
    if not osp.exists(folder):
        return False
    if _marker(folder) != _parts_marker(config):
        raise RuntimeError(
            '"{}" exists but does not hold complete part masks of version {} for '
            'this dataset (missing or different {}); delete that folder and they '
            'will be drawn again.'.format(folder, PARTS_VERSION, MARKER))
    return True


def prepare_parts(dataset_dir: str) -> str:
    """The folder of the part masks of the synthetic dataset in
    ``dataset_dir`` (:func:`parts_folder`), drawing them first (once, safely,
    as :func:`prepare` draws the images) if absent.

    Raises:
        RuntimeError: ``dataset_dir`` is not a complete synthetic dataset, or
            was drawn by another version of the generator, or the parts
            folder is foreign or half-written.
    """
    dataset_dir = osp.normpath(osp.abspath(dataset_dir))
    config = _dataset_marker(dataset_dir)
    folder = parts_folder(dataset_dir)
    if _parts_ready(folder, config):
        return folder
    return _make_once(
        folder, lambda: _parts_ready(folder, config),
        lambda dest: generate_parts(dest, config, dataset_dir),
        'Drawing the part masks of "{}" into "{}" (one-off)'.format(
            dataset_dir, folder))


def is_synthetic_dataset(dataset_dir: str) -> bool:
    """Whether ``dataset_dir`` holds a synthetic dataset (by its marker)."""
    try:
        with open(osp.join(dataset_dir, MARKER)) as f:
            return json.load(f).get('format') == 'pmm_synthetic'
    except (OSError, ValueError, AttributeError):
        return False


def _read(folder: str, relabel: bool) -> List[Tuple[str, int, int]]:
    items = []
    for path in sorted(glob.glob(osp.join(folder, '*.png'))):
        match = _NAME.match(osp.basename(path))
        if match is None:
            raise RuntimeError(
                '"{}" is not a file of the synthetic dataset (expected names like '
                '0001_c1_00.png); remove it'.format(path))
        pid, cam, _ = map(int, match.groups())
        items.append((path, pid, cam - 1))
    if relabel:
        label = {pid: i for i, pid in enumerate(sorted({p for _, p, _ in items}))}
        items = [(path, label[pid], cam) for path, pid, cam in items]
    return items


class SyntheticPersons(torchreid.data.ImageDataset):
    """Synthetic pedestrians, drawn on first use; needs no download.

    Dataset statistics (defaults):
        - identities: 100 (train) + 100 (test), disjoint.
        - cameras: 4 (light, colour cast, background, position, scale).
        - images: 800 (train) + 400 (query, one per test identity and camera)
          + 400 (gallery), 128 x 64 PNG.

    The sizes are class attributes; subclass with another ``dataset_dir`` to
    change them.

    Args:
        root (str, optional): root path of the datasets; the images go to
            ``<root>/pmm_synthetic``. Default is ''.
        kwargs: passed on to ``torchreid.data.ImageDataset`` (``transform``,
            ``mode``, ``combineall``, ``verbose``, ...; others are ignored).
    """
    dataset_dir = 'pmm_synthetic'
    num_train_ids = 100
    num_test_ids = 100
    num_cams = 4
    imgs_per_cam = 2
    seed = SEED

    def __init__(self, root: str = '', **kwargs) -> None:
        self.root = osp.abspath(osp.expanduser(root))
        config = {k: int(getattr(self, k)) for k in (
            'num_train_ids', 'num_test_ids', 'num_cams', 'imgs_per_cam', 'seed')}
        self.dataset_dir = prepare(self.root, self.dataset_dir, config)
        train = _read(osp.join(self.dataset_dir, 'train'), relabel=True)
        query = _read(osp.join(self.dataset_dir, 'query'), relabel=False)
        gallery = _read(osp.join(self.dataset_dir, 'gallery'), relabel=False)
        super().__init__(train, query, gallery, **kwargs)


DATASETS = {'pmm_synthetic': SyntheticPersons}
