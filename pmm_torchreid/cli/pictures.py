"""What each PMM stage looks at: Grad-CAM pictures of query images, and the
mean pairwise overlap between the stages over the query set.

The command line of ``scripts/visualize_gradcam.py``.  Same flags and
trailing KEY VALUE overrides as scripts/main.py (options of this script go
before the KEY VALUE pairs).  For each chosen query image it writes one PNG:
the image, the Grad-CAM of every stage with its top-K blocks, and the partner
of another identity and the mixed input of each mixed stage as in training;
plus a contact sheet of all of them, and ``overlap.json``
(:class:`pmm_torchreid.visualize.gradcam.StagePictures`).

Query identities are not classes of the classifier, so each Grad-CAM is taken
at the class that the summed logits of all stages predict.

What is drawn follows the model's family
(:func:`pmm_torchreid.models.families.family_of`'s ``pictures``): for the
comparison systems it is what the network itself weights: FMN's feature mask
and MagnifierNet's predicted semantic regions next to the data's, see
:mod:`pmm_torchreid.visualize.masks` (``masks.json``; ``--overlap-num`` does
not apply).  BDB and torchreid's models are refused with a message.
"""
from __future__ import annotations

import argparse
import json
import os.path as osp

import torch

from pmm_torchreid import launch
from pmm_torchreid.config import checks
from pmm_torchreid.config.kwargs import imagedata_kwargs, mixed_blocks
from pmm_torchreid.data.datamanager import build_datamanager
from pmm_torchreid.data.parsing import RegionSource
from pmm_torchreid.data.queries import choose_queries, query_set
from pmm_torchreid.models.families import family_of
from pmm_torchreid.models.guidance import build_mixer
from pmm_torchreid.utils.checkpoint import load_pretrained_weights
from pmm_torchreid.utils.io import atomic_write, json_safe
from pmm_torchreid.visualize.gradcam import StagePictures, draw_partners, format_overlap
from pmm_torchreid.visualize.masks import MaskPictures
from pmm_torchreid.visualize.overlap import chance_iou

__all__ = ['build_parser', 'pictures', 'stage_pictures', 'mask_pictures',
           'main']


def build_parser() -> argparse.ArgumentParser:
    parser = launch.build_parser()
    parser.description = __doc__.splitlines()[0]
    parser.add_argument('--num', type=int, default=8,
                        help='random query images to picture (seeded)')
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of the image and partner choice')
    parser.add_argument('--indices', type=int, nargs='+', default=None,
                        help='picture these query indices instead of random '
                        'ones (put another option after the list, before '
                        'KEY VALUE pairs)')
    parser.add_argument('--output', type=str, default='',
                        help='output folder (default: <data.save_dir>/gradcam)')
    parser.add_argument('--sheet', type=int, default=4,
                        help='images per row of the contact sheet')
    parser.add_argument('--dataset', type=str, default='',
                        help='target dataset whose query set is used '
                        '(default: the first of data.targets)')
    parser.add_argument('--overlap-num', type=int, default=0,
                        help='measure the overlap on the first M queries '
                        '(0: all; -1: skip)')
    return parser


def pictures(argv=None) -> dict:
    """Builds the model of the config, loads ``model.load_weights`` and
    writes the pictures its family has; returns the report (what
    ``overlap.json`` or ``masks.json`` holds).

    Raises:
        ValueError: a bad option, or a model without pictures of its own.
    """
    args = build_parser().parse_args(argv)
    if args.num < 1:
        raise ValueError('--num {}: expected >= 1'.format(args.num))
    if args.sheet < 1:
        raise ValueError('--sheet {}: expected >= 1'.format(args.sheet))
    cfg = launch.setup_config(args)
    family = family_of(cfg.model.name)
    kind = family.pictures if family is not None else ''
    if not kind:
        raise ValueError(
            'model.name = {!r}: Grad-CAM stage pictures need a PMM model '
            '(pmm, pmm_resnet50, pmm_resnet18, pmm_osnet_x0_25); for FMN and '
            'MagnifierNet models this script draws their masks instead'.format(
                cfg.model.name))
    checks.check_paths(cfg)  # the dataset and the weights file exist
    torch.manual_seed(cfg.train.seed)
    datamanager = build_datamanager(**imagedata_kwargs(cfg))
    model = launch.build_model(cfg, datamanager.num_train_pids)
    if cfg.model.load_weights:
        load_pretrained_weights(model, cfg.model.load_weights)
    else:
        print('Warning: no model.load_weights given; picturing an untrained '
              'model')
    device = 'cuda' if cfg.use_gpu and torch.cuda.is_available() else 'cpu'
    model = model.to(device).eval()

    name = args.dataset or cfg.data.targets[0]
    query = query_set(datamanager, name)
    chosen = choose_queries(query, name, args.num, args.seed, args.indices)
    draw = mask_pictures if kind == 'masks' else stage_pictures
    return draw(args, cfg, model, datamanager.transform_te, query, name,
                chosen, device)


def stage_pictures(args, cfg, model, transform, query, name, chosen,
                   device) -> dict:
    """Each PMM stage's Grad-CAM for the ``chosen`` queries, and the stages'
    overlap (``overlap.json``)."""
    items = [query[i] for i in chosen]
    pool_pids = [int(it[1]) for it in query]
    gen = torch.Generator().manual_seed(args.seed + 1)
    # pmm.top_k, or what pmm.mix_ratio gives; the blocks of the grid
    top_k, blocks = mixed_blocks(cfg)
    # the chain of the model's own rule (A-Hard-Mix for a model trained
    # without one, to show what the paper's rule would do)
    rule = build_mixer(cfg.pmm.mix if cfg.pmm.mix != 'none' else 'hard_mix',
                       block=cfg.pmm.block_size, k=top_k)
    stages = StagePictures(model, transform, cfg.pmm.block_size, top_k, device,
                           rule=rule)
    partners = [[query[j] for j in draw_partners([it[1] for it in items],
                                                 pool_pids, gen)]
                for _ in range(stages.num_stages - 1)]

    out_dir = args.output or osp.join(cfg.data.save_dir, 'gradcam')
    weights = cfg.model.load_weights or 'untrained'
    res = stages.write(
        items, partners, out_dir, columns=args.sheet,
        title='{} on {} query: Grad-CAM per stage, top-{} blocks outlined '
        '(IoU: mean top-K IoU between stages)'.format(
            osp.basename(weights), name, top_k),
        prefixes=['q{:04d}'.format(i) for i in chosen])
    _wrote(res)
    report = {
        'weights': weights, 'dataset': name, 'model': cfg.model.name,
        'block_size': list(cfg.pmm.block_size), 'top_k': top_k,
        'pictured': chosen,
    }
    if args.overlap_num >= 0:
        subset = query[:args.overlap_num] if args.overlap_num else query
        summary = stages.overlap(subset, query, gen,
                                 batch_size=cfg.test.batch_size)
        summary['chance_mask_iou'] = chance_iou(blocks, top_k)
        print(format_overlap(summary, blocks, top_k))
        report['overlap'] = summary
    return _save(report, osp.join(out_dir, 'overlap.json'))


def mask_pictures(args, cfg, model, transform, query, name, chosen,
                  device) -> dict:
    """FMN's mask or MagnifierNet's regions for the ``chosen`` queries
    (``masks.json``)."""
    items = [query[i] for i in chosen]
    source = RegionSource(cfg.magnifiernet.masks_root, cfg.data.root,
                          cfg.magnifiernet.mask_labels,
                          cfg.magnifiernet.regions == 'bands')
    masks = MaskPictures(model, transform, device, source)
    out_dir = args.output or osp.join(cfg.data.save_dir, 'masks')
    weights = cfg.model.load_weights or 'untrained'
    what = 'FMN feature mask (jet: 0 blue .. 1 red)' \
        if masks.kind == 'fmn' else \
        'MagnifierNet regions: head orange, upper red, lower blue, shoes purple'
    res = masks.write(items, out_dir, columns=args.sheet,
                      title='{} on {} query: {}'.format(
                          osp.basename(weights), name, what),
                      prefixes=['q{:04d}'.format(i) for i in chosen])
    _wrote(res)
    print('Mean over the pictured queries: {}'.format(', '.join(
        '{} {:.3f}'.format(k, v) for k, v in res['mean'].items())))
    report = {'weights': weights, 'dataset': name, 'model': cfg.model.name,
              'pictured': chosen, 'mean': res['mean'],
              'per_image': res['per_image']}
    return _save(report, osp.join(out_dir, 'masks.json'))


def _wrote(res: dict) -> None:
    print('Wrote {} panels and the contact sheet "{}"'.format(
        len(res['panels']), res['sheet']))


def _save(report: dict, path: str) -> dict:
    with atomic_write(path, 'w') as f:
        json.dump(json_safe(report), f, indent=1, allow_nan=False)
    print('Saved "{}"'.format(path))
    return report


def main(argv=None) -> None:
    """:func:`pictures` (errors propagate: a traceback and exit status 1
    from ``scripts/visualize_gradcam.py``)."""
    pictures(argv)
