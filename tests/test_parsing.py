"""Semantic regions for MagnifierNet: the synthetic dataset's exact part
masks, the parser label -> region table, masks mirroring data.root, the band
fallback and its warning, and masks that follow the image through the same
flips, resizes and crops."""
import os
import random

import numpy as np
import pytest
import torch
import torchreid
import torchvision.transforms as T
from PIL import Image

import pmm_torchreid  # noqa: F401  (registers pmm_synthetic)
from pmm_torchreid.data import Cutout, parsing, synthetic
from pmm_torchreid.data.parsing import (
    BANDS,
    PairedTransform,
    RegionSource,
    attach_region_masks,
    band_regions,
    load_regions,
    region_table,
)
from pmm_torchreid.data.synthetic import SyntheticPersons


class Tiny(SyntheticPersons):
    dataset_dir = 'tiny_synthetic'
    num_train_ids = 4
    num_test_ids = 2
    num_cams = 2
    imgs_per_cam = 2


def _files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder)
                  for d, _, names in os.walk(folder) for f in names)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    return Tiny(root=str(tmp_path_factory.mktemp('tiny')), verbose=False)


# --------------------------------------------------------------------------
# the synthetic dataset's part masks
# --------------------------------------------------------------------------
def test_parts_are_drawn_next_to_the_images_which_stay_untouched(tiny):
    before = {f: open(os.path.join(tiny.dataset_dir, f), 'rb').read()
              for f in _files(tiny.dataset_dir)}
    parts = synthetic.prepare_parts(tiny.dataset_dir)
    assert parts == tiny.dataset_dir + '_parts'
    after = {f: open(os.path.join(tiny.dataset_dir, f), 'rb').read()
             for f in _files(tiny.dataset_dir)}
    assert after == before  # no file added or changed in the dataset
    images = [f for f in before if f.endswith('.png')]
    assert sorted(f for f in _files(parts) if f.endswith('.png')) == images
    for f in images:
        mask = Image.open(os.path.join(parts, f))
        assert mask.mode == 'L' and mask.size == (64, 128)
        ids = set(np.unique(np.asarray(mask)).tolist())
        assert ids <= set(synthetic.PART_LABELS.values())
        assert {0, 2, 5, 13} <= ids  # background, hair, shirt, face
    # a second call reuses them
    stamp = os.stat(os.path.join(parts, synthetic.MARKER)).st_mtime_ns
    assert synthetic.prepare_parts(tiny.dataset_dir) == parts
    assert os.stat(os.path.join(parts, synthetic.MARKER)).st_mtime_ns == stamp


def _grow(mask, steps):
    """``mask`` dilated by ``steps`` pixels (4-neighbourhood)."""
    mask = mask.copy()
    for _ in range(steps):
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        mask = grown
    return mask


def _colour_agreement(pixels, labels, ident, cam):
    """``(inside, ring)`` for the parts of one plain colour (shirt, hair,
    trousers, face): the share of each part's inner pixels (a pixel away
    from its edge) that have the part's colour, as the camera's gain and
    noise leave it, and the same share on a ring 2 to 4 pixels outside it;
    each the mean over the parts."""
    colours = {'upper_clothes': synthetic.SHIRT[ident['shirt']],
               'hair': synthetic.HAIR[ident['hair']],
               'pants': synthetic.LEGS[ident['legs']],
               'face': synthetic.SKIN[ident['skin']]}
    gain, noise = np.array(cam[4]), cam[8]
    inside, ring = [], []
    for part, colour in colours.items():
        expected = np.clip(np.array(colour) * gain, 0, 255)
        close = (np.abs(pixels - expected) <= 0.1 * expected + 3 * noise + 8
                 ).all(axis=-1)
        where = labels == synthetic.PART_LABELS[part]
        inner = ~_grow(~where, 1)
        assert inner.sum() > 10, part
        inside.append(close[inner].mean())
        ring.append(close[_grow(where, 4) & ~_grow(where, 1)].mean())
    return float(np.mean(inside)), float(np.mean(ring))


def _columns(labels, side):
    """Mean column of the pixels labelled as the person's ``side`` limbs."""
    ids = [synthetic.PART_LABELS[side + '_' + p] for p in ('arm', 'leg', 'shoe')]
    return float(np.nonzero(np.isin(labels, ids))[1].mean())


def test_drawing_the_parts_does_not_change_the_image():
    """The mask is drawn with the image's geometry: every part's pixels
    have its colour in the image and the pixels around it have not; the
    same mask shifted by a few pixels or flipped agrees far less, and the
    person's right limbs are on the image's left (the figures face the
    camera), which a mirrored mask would swap."""
    config = {k: int(getattr(SyntheticPersons, k)) for k in (
        'num_train_ids', 'num_test_ids', 'num_cams', 'imgs_per_cam', 'seed')}
    plan = synthetic._plan(config)
    for _ in range(12):
        ident, cam, _, split, name = next(plan)
        seeds = [config['seed'], 1, int(name[:4]), int(name[6]) - 1,
                 int(name[8:10])]
        plain = synthetic._render(ident, cam, np.random.default_rng(seeds))
        img, mask = synthetic._render(ident, cam, np.random.default_rng(seeds),
                                      True)
        assert img.tobytes() == plain.tobytes()
        labels = np.asarray(mask)
        pixels = np.asarray(img).astype(float)
        assert pixels.shape[:2] == labels.shape
        assert (labels == synthetic.PART_LABELS['upper_clothes']).sum() > 100
        inside, ring = _colour_agreement(pixels, labels, ident, cam)
        assert inside >= 0.8 and ring <= 0.3, (name, inside, ring)
        for moved in (np.roll(labels, 8, axis=0), np.roll(labels, 6, axis=1),
                      labels[::-1]):
            worse = _colour_agreement(pixels, moved, ident, cam)
            assert worse[0] - worse[1] < inside - ring - 0.3, (name, worse)
        assert _columns(labels, 'right') < _columns(labels, 'left') - 4, name
        mirrored = labels[:, ::-1]
        assert _columns(mirrored, 'right') > _columns(mirrored, 'left'), name


def test_parts_of_a_dataset_from_another_generator_are_refused(tmp_path):
    ds = Tiny(root=str(tmp_path), verbose=False)
    path = os.path.join(ds.dataset_dir, 'train', '0001_c1_00.png')  # drawn first
    Image.new('RGB', (64, 128), (1, 2, 3)).save(path)
    with pytest.raises(RuntimeError, match='another version'):
        synthetic.prepare_parts(ds.dataset_dir)
    assert not os.path.exists(ds.dataset_dir + '_parts')


def test_synthetic_masks_are_located_for_its_images(tiny):
    source = RegionSource()
    img = tiny.train[0][0]
    path, labels = source.locate(img)
    assert labels == 'lip' and path == os.path.join(
        tiny.dataset_dir + '_parts', 'train', os.path.basename(img))
    regions = np.asarray(source.regions(img, (64, 128)))
    raw = np.asarray(Image.open(path))
    assert (regions == region_table('lip')[raw]).all()
    assert set(np.unique(regions).tolist()) <= {0, 1, 2, 3, 4}
    # the head is above the upper body, above the lower body, above the shoes
    rows = [np.nonzero((regions == r).any(axis=1))[0].mean()
            for r in (1, 2, 3, 4)]
    assert rows == sorted(rows)


# --------------------------------------------------------------------------
# parser labels -> regions
# --------------------------------------------------------------------------
@pytest.mark.parametrize('labels, expected', [
    ('lip', {0: 0, 1: 1, 2: 1, 4: 1, 13: 1, 5: 2, 7: 2, 14: 2, 15: 2, 9: 3,
             12: 3, 16: 3, 17: 3, 8: 4, 18: 4, 19: 4}),
    ('cihp', {2: 1, 5: 2, 9: 3, 19: 4}),
    ('atr', {0: 0, 2: 1, 11: 1, 4: 2, 14: 2, 6: 3, 5: 3, 12: 3, 9: 4, 10: 4,
             16: 0}),
])
def test_label_table(labels, expected):
    table = region_table(labels)
    for label, region in expected.items():
        assert table[label] == region, (labels, label)
    size = len(parsing.LABEL_SETS[labels])
    assert (table[size:] == 255).all()  # ids the set lacks are invalid


def test_bad_label_pngs_are_refused_with_the_file(tmp_path):
    rgb = str(tmp_path / 'rgb.png')
    Image.new('RGB', (4, 8)).save(rgb)
    with pytest.raises(ValueError, match='rgb.png.*mode RGB'):
        load_regions(rgb, region_table('lip'), (4, 8), 'lip')
    ids = np.zeros((8, 4), np.uint8)
    ids[0, 0] = 19  # a LIP id that ATR (0..17) lacks
    bad = str(tmp_path / 'ids.png')
    Image.fromarray(ids).save(bad)
    with pytest.raises(ValueError, match=r'ids.png.*\[19\].*atr'):
        load_regions(bad, region_table('atr'), (4, 8), 'atr')
    # a mask of another size is resized to the image's (nearest)
    out = load_regions(bad, region_table('lip'), (8, 16), 'lip')
    assert out.size == (8, 16) and np.asarray(out)[:2, :2].tolist() == \
        [[4, 4], [4, 4]]


def test_bands():
    regions = np.asarray(band_regions(10, 100))
    assert regions.shape == (100, 10) and (regions == regions[:, :1]).all()
    for region, top, bottom in BANDS:
        assert (regions[int(top * 100):int(bottom * 100)] == region).all()


# --------------------------------------------------------------------------
# masks through the training transform
# --------------------------------------------------------------------------
def _half_and_half(width=32, height=64):
    """An image white on the left, black on the right, and its mask: region
    2 on the left, 3 on the right."""
    img = np.zeros((height, width, 3), np.uint8)
    img[:, :width // 2] = 255
    mask = np.full((height, width), 3, np.uint8)
    mask[:, :width // 2] = 2
    return Image.fromarray(img), Image.fromarray(mask, 'L')


def _train_transform(transforms):
    tr, _ = torchreid.data.transforms.build_transforms(
        64, 32, transforms=transforms)
    tr.transforms.append(Cutout(8, p=0.5))
    return tr


def test_masks_follow_flips_and_crops_and_the_image_is_unchanged():
    tr = _train_transform(['random_flip', 'random_crop', 'color_jitter',
                           'random_erase'])
    paired = PairedTransform(tr)
    img, mask = _half_and_half()
    flips = set()
    for seed in range(30):
        torch.manual_seed(seed)
        random.seed(seed)
        plain = tr(img)
        torch.manual_seed(seed)
        random.seed(seed)
        got, regions = paired(img, mask)
        torch.testing.assert_close(got, plain, rtol=0, atol=0)  # same draws
        assert regions.shape == (64, 32) and regions.dtype == torch.uint8
        assert set(regions.unique().tolist()) == {2, 3}
        left = int(regions[32, 0])
        flips.add(left)
        # every row: one side region 2, the other 3, switching once
        rows = regions.int()
        assert bool(((rows[:, 1:] - rows[:, :-1]).abs().sum(dim=1) == 1).all())
    assert flips == {2, 3}  # both flipped and unflipped draws happened


def test_white_pixels_carry_the_white_sides_region():
    tr = _train_transform(['random_flip', 'random_crop'])
    tr.transforms = [t for t in tr.transforms
                     if type(t).__name__ not in ('Normalize', 'Cutout')]
    paired = PairedTransform(tr)
    img, mask = _half_and_half()
    for seed in range(20):
        torch.manual_seed(seed)
        random.seed(seed)
        got, regions = paired(img, mask)
        gray = got.mean(dim=0)
        assert bool((regions[gray > 0.95] == 2).all())
        assert bool((regions[gray < 0.05] == 3).all())


def test_unknown_transform_is_named():
    with pytest.raises(TypeError, match='RandomRotation'):
        PairedTransform(T.Compose([T.RandomRotation(10), T.ToTensor()]))


# --------------------------------------------------------------------------
# batches with masks
# --------------------------------------------------------------------------
def _datamanager(root, **kwargs):
    return torchreid.data.ImageDataManager(
        root=root, sources='tiny_synthetic', height=64, width=32, workers=0,
        batch_size_train=8, train_sampler='RandomIdentitySampler',
        num_instances=2, transforms=['random_flip'], **kwargs)


@pytest.fixture(scope='module')
def tiny_registered(tiny):
    from pmm_torchreid.registry import register_into
    from pmm_torchreid.utils.torchreid_internals import _table
    register_into(_table(torchreid.data.datasets, '__image_datasets'),
                  {'tiny_synthetic': Tiny}, 'image dataset')
    return os.path.dirname(tiny.dataset_dir)


def test_training_batches_carry_masks_that_follow_the_flips(tiny_registered):
    dm = attach_region_masks(_datamanager(tiny_registered))
    assert attach_region_masks(dm) is dm  # idempotent
    te = dm.transform_te
    source = RegionSource()
    flipped = set()
    for batch in dm.train_loader:
        assert batch['regions'].shape == (8, 64, 32)
        assert batch['regions'].dtype == torch.uint8
        for img, regions, path in zip(batch['img'], batch['regions'],
                                      batch['impath']):
            raw = Image.open(path).convert('RGB')
            straight = te(raw)
            mask = source.regions(path, raw.size).resize((32, 64),
                                                         Image.NEAREST)
            mask = torch.from_numpy(np.array(mask))
            if torch.equal(img, straight):
                assert torch.equal(regions, mask)
                flipped.add(False)
            else:
                torch.testing.assert_close(img, straight.flip(-1), rtol=0,
                                           atol=0)
                assert torch.equal(regions, mask.flip(-1))
                flipped.add(True)
    assert flipped == {False, True}
    # the loader kept the identity sampler and the batch size
    assert type(dm.train_loader.sampler).__name__ == 'RandomIdentitySampler'
    assert dm.train_loader.batch_size == 8 and dm.train_loader.drop_last


def _copy_without_marker(tiny, dest):
    """The tiny dataset's training images in a folder that is not a
    synthetic dataset, as a torchreid dataset list."""
    items = []
    os.makedirs(os.path.join(dest, 'mine', 'train'))
    for path, pid, camid, *_ in tiny.train:
        new = os.path.join(dest, 'mine', 'train', os.path.basename(path))
        Image.open(path).save(new)
        items.append((new, pid, camid))
    return items


class _Manager(object):
    """The part of a data manager attach_region_masks uses."""

    def __init__(self, items):
        transform = _train_transform(['random_flip'])
        dataset = torchreid.data.ImageDataset(
            items, [items[0]], [items[0]], transform=transform, verbose=False)
        self.train_loader = torch.utils.data.DataLoader(
            dataset, batch_size=4, shuffle=False, drop_last=True)


def test_without_masks_bands_are_used_and_a_warning_says_so(tiny, tmp_path):
    manager = _Manager(_copy_without_marker(tiny, str(tmp_path)))
    with pytest.warns(UserWarning, match='FIXED HORIZONTAL BANDS'):
        attach_region_masks(manager, data_root=str(tmp_path))
    batch = next(iter(manager.train_loader))
    # the bands of the 64 x 128 image, through the resize to 32 x 64
    expected = torch.from_numpy(np.array(band_regions(64, 128).resize(
        (32, 64), Image.NEAREST)))
    assert all(torch.equal(r, expected) for r in batch['regions'])


def test_masks_root_mirrors_data_root(tiny, tmp_path):
    items = _copy_without_marker(tiny, str(tmp_path / 'data'))
    masks = tmp_path / 'masks'
    for path, *_ in items[1:]:  # one mask missing
        rel = os.path.relpath(path, str(tmp_path / 'data'))
        out = masks / (os.path.splitext(rel)[0] + '.png')
        out.parent.mkdir(parents=True, exist_ok=True)
        ids = np.full((128, 64), 9, np.uint8)  # LIP pants: lower body
        ids[:20] = 2  # hair: head
        Image.fromarray(ids).save(str(out), format='PNG')
    manager = _Manager(items)
    with pytest.raises(FileNotFoundError, match='1 of {} training images have '
                       'no mask'.format(len(items))):
        attach_region_masks(manager, str(masks), str(tmp_path / 'data'))
    Image.fromarray(np.full((128, 64), 18, np.uint8)).save(str(
        masks / 'mine' / 'train' / (os.path.splitext(
            os.path.basename(items[0][0]))[0] + '.png')))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no band warning
        attach_region_masks(manager, str(masks), str(tmp_path / 'data'))
    regions = next(iter(manager.train_loader))['regions']
    assert int(regions[0].min()) == int(regions[0].max()) == 4  # shoes only
    assert set(regions[1].unique().tolist()) == {1, 3}
    assert bool((regions[1][:10] == 1).all())  # 20 of 128 rows -> 10 of 64


def test_forced_bands_replace_even_the_synthetic_masks(tiny, capsys):
    img = tiny.train[0][0]
    exact = np.asarray(RegionSource().regions(img, (64, 128)))
    forced = RegionSource(bands=True)
    assert forced.locate(img) == (None, '')
    banded = np.asarray(forced.regions(img, (64, 128)))
    assert (banded == np.asarray(band_regions(64, 128))).all()
    assert not (banded == exact).all()  # the exact masks are not bands
    manager = _Manager([(p, pid, camid) for p, pid, camid, *_ in tiny.train])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # chosen, so no warning
        attach_region_masks(manager, bands=True)
    assert "magnifiernet.regions 'bands'" in capsys.readouterr().out
    regions = next(iter(manager.train_loader))['regions']
    expected = torch.from_numpy(np.array(band_regions(64, 128).resize(
        (32, 64), Image.NEAREST)))
    assert all(torch.equal(r, expected) for r in regions)


def test_forced_bands_with_a_masks_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="masks_root .* would be ignored"):
        RegionSource(str(tmp_path), bands=True)
