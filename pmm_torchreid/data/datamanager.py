"""The data manager builder: torchreid's ``ImageDataManager`` plus the
transform ``'cutout'`` (the PMM recipe), validation identities held out of the
training set, and images checked (or bad ones left out) before any training."""
from __future__ import annotations

import torchreid

from pmm_torchreid.data.images import DATASET_LISTS, BadImageError, drop_bad_images, scan_bad_images
from pmm_torchreid.data.splits import hold_out_validation
from pmm_torchreid.data.transforms import Cutout
from pmm_torchreid.utils.torchreid_internals import dataset_factory_hook

__all__ = ['build_datamanager']


def build_datamanager(
    cutout_size: int = 64,
    cutout_prob: float = 0.5,
    cutout_inside: bool = True,
    check_images: bool = True,
    skip_bad_images: bool = False,
    val_ids: int = 0,
    val_seed: int = 0,
    **kwargs
):
    """``torchreid.data.ImageDataManager(**kwargs)``, plus ``'cutout'`` and
    the image checks.

    When ``'cutout'`` is among ``kwargs['transforms']``, it is removed before
    torchreid sees the list and a :class:`Cutout` is appended to the training
    transform, after normalisation.

    With ``check_images`` (the default), every train/query/gallery image is
    decoded once while the data manager is built (threads; about 0.25 ms per
    image here), before any training: bad images raise
    :class:`BadImageError` listing all of them, or, with ``skip_bad_images``,
    are left out of the lists (one warning each) before torchreid builds its
    samplers.  Without the check, a bad image stops the run when it is first
    read -- possibly hours later, at the first evaluation.

    With ``val_ids`` > 0, that many training identities of the source dataset
    are held out (:func:`pmm_torchreid.data.splits.carve_validation`, drawn with
    ``val_seed``) and become the query and gallery that are evaluated; the
    model trains on the other identities and the test split is not read.
    """
    cutout = (cutout_size, cutout_prob, cutout_inside)
    if check_images or skip_bad_images or val_ids:
        return _with_dataset_hook(
            _build, check_images or skip_bad_images, skip_bad_images,
            val_ids, val_seed, cutout=cutout, **kwargs
        )
    return _build(cutout, **kwargs)


def _build(cutout, **kwargs):
    transforms = kwargs.get('transforms') or []
    if isinstance(transforms, str):
        transforms = [transforms]
    transforms = [t.lower() for t in transforms]
    use_cutout = 'cutout' in transforms
    kwargs['transforms'] = [t for t in transforms if t != 'cutout']
    datamanager = torchreid.data.ImageDataManager(**kwargs)
    if use_cutout:
        op = Cutout(*cutout)
        print('+ cutout {}x{} (p={}, {}) after normalization'.format(
            op.size, op.size, op.p, 'inside the image' if op.inside else
            'clipped at the border'))
        seen = set()
        for compose in (datamanager.transform_tr,
                        datamanager.train_loader.dataset.transform):
            if id(compose) not in seen:
                compose.transforms.append(op)
                seen.add(id(compose))
    return datamanager


def _with_dataset_hook(build, check: bool, skip: bool, val_ids: int,
                       val_seed: int, **kwargs):
    """Runs ``build(**kwargs)`` with torchreid's dataset factory wrapped so
    that every dataset, as it is created, has its validation identities held
    out (``val_ids``) and its images decoded once (``check``)."""
    cache, reported = {}, set()

    def init_and_check(original, name, **dataset_kwargs):
        dataset = original(name, **dataset_kwargs)
        if val_ids:
            counts = hold_out_validation(dataset, val_ids, val_seed)
            if ('val', name) not in reported:
                reported.add(('val', name))
                print('=> {}: validation, not the test split: {} training '
                      'identities held out (data.val_seed {}) as {} query and '
                      '{} gallery images; training on the other {} identities '
                      '({} images)'.format(
                          name, val_ids, val_seed, counts['query'],
                          counts['gallery'], counts['train_ids'],
                          counts['train_images']))
        if not check:
            return dataset
        if skip:
            before = {s: len(getattr(dataset, s)) for s in DATASET_LISTS}
            drop_bad_images(dataset, cache=cache, name=name)
            counts = {s: n - len(getattr(dataset, s)) for s, n in before.items()}
            if any(counts.values()) and name not in reported:
                reported.add(name)
                print('=> {}: left out {} bad image(s) ({} train, {} query, {} '
                      'gallery)'.format(name, sum(counts.values()),
                                        counts['train'], counts['query'],
                                        counts['gallery']))
            return dataset
        bad = scan_bad_images(dataset, cache, name)
        if bad:
            listed = ''.join('\n  "{}": {}'.format(p, r) for p, r in bad[:20])
            more = '\n  ... and {} more'.format(len(bad) - 20) \
                if len(bad) > 20 else ''
            raise BadImageError(
                '{} bad image(s) in dataset {!r}; stopping before any '
                'training:{}{}\nFix or remove them, or set '
                'data.skip_bad_images True to leave them out'.format(
                    len(bad), name, listed, more
                )
            )
        return dataset

    def wrap(original):
        return lambda name, **dataset_kwargs: init_and_check(
            original, name, **dataset_kwargs)

    with dataset_factory_hook(wrap):
        return build(**kwargs)


