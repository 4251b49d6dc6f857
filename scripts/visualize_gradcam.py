#!/usr/bin/env python
"""What each PMM stage looks at: Grad-CAM pictures of query images, and the
mean pairwise overlap between the stages over the query set.

Same flags and trailing KEY VALUE overrides as scripts/main.py (options of this
script go before the KEY VALUE pairs).  For each chosen query image it writes
one PNG: the image, the Grad-CAM of every stage with its top-K blocks, and the
partner of another identity and the mixed input of each mixed stage as in
training; plus a contact sheet of all of them, and ``overlap.json``.

Query identities are not classes of the classifier, so each Grad-CAM is taken
at the class that the summed logits of all stages predict.

For the comparison systems the pictures are what the network itself weights:
FMN's feature mask (``fmn*``) and MagnifierNet's predicted semantic regions
next to the data's (``magnifiernet*``), see
:mod:`pmm_torchreid.mask_pictures`; ``--overlap-num`` does not apply.  BDB and
torchreid's models are refused with a message.

Examples::

    python scripts/visualize_gradcam.py --config-file configs/pmm_demo.yaml \\
        model.load_weights log/pmm_demo/model/model.pth.tar-24
    python scripts/visualize_gradcam.py --config-file configs/pmm_demo.yaml \\
        --num 16 --seed 3 --output log/pmm_demo/gradcam-q --sheet 8 \\
        model.load_weights log/pmm_demo/model/model.pth.tar-24
    python scripts/visualize_gradcam.py --config-file configs/pmm_demo.yaml \\
        --indices 0 1 2 --sheet 3 \\
        model.load_weights log/pmm_demo/model/model.pth.tar-24
"""
import json
import os.path as osp
import sys

import torch

try:
    import pmm_torchreid  # noqa: F401  (installed: pip install -e .)
except ImportError:  # run from a source tree that is not installed
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from pmm_torchreid import launch  # noqa: E402
from pmm_torchreid import checks, config as C  # noqa: E402
from pmm_torchreid.checkpoint import (  # noqa: E402
    atomic_write, load_pretrained_weights
)
from pmm_torchreid.data import build_datamanager  # noqa: E402
from pmm_torchreid.guidance import build_mixer  # noqa: E402
from pmm_torchreid.backbones import feature_map_size  # noqa: E402
from pmm_torchreid.models import model_backbone  # noqa: E402
from pmm_torchreid.visualize import (  # noqa: E402
    StagePictures, chance_iou, draw_partners, format_overlap,
    json_safe
)


def build_parser():
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


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.num < 1:
        raise ValueError('--num {}: expected >= 1'.format(args.num))
    if args.sheet < 1:
        raise ValueError('--sheet {}: expected >= 1'.format(args.sheet))
    cfg = launch.setup_config(args)
    comparison = C.is_comparison_model(cfg.model.name)
    if not (C.is_pmm_model(cfg.model.name) or comparison):
        raise ValueError(
            'model.name = {!r}: Grad-CAM stage pictures need a PMM model '
            '(pmm, pmm_resnet50, pmm_resnet18, pmm_osnet_x0_25); for FMN and '
            'MagnifierNet models this script draws their masks instead'.format(
                cfg.model.name))
    checks.check_paths(cfg)  # the dataset and the weights file exist
    torch.manual_seed(cfg.train.seed)
    datamanager = build_datamanager(**C.imagedata_kwargs(cfg))
    model = launch.build_model(cfg, datamanager.num_train_pids)
    if cfg.model.load_weights:
        load_pretrained_weights(model, cfg.model.load_weights)
    else:
        print('Warning: no model.load_weights given; picturing an untrained '
              'model')
    device = 'cuda' if cfg.use_gpu and torch.cuda.is_available() else 'cpu'
    model = model.to(device).eval()

    name = args.dataset or cfg.data.targets[0]
    if name not in datamanager.test_dataset:
        raise ValueError('--dataset {!r}: expected one of data.targets {}'.format(
            name, list(datamanager.test_dataset)))
    query = list(datamanager.test_dataset[name]['query'])
    if comparison:
        return mask_pictures(args, cfg, model, datamanager, query, name,
                             device)
    chosen = choose(args, query, name)
    items = [query[i] for i in chosen]
    pool_pids = [int(it[1]) for it in query]
    gen = torch.Generator().manual_seed(args.seed + 1)
    top_k = C.resolved_top_k(cfg)  # pmm.top_k, or what pmm.mix_ratio gives
    # the chain of the model's own rule (A-Hard-Mix for a model trained
    # without one, to show what the paper's rule would do)
    rule = build_mixer(cfg.pmm.mix if cfg.pmm.mix != 'none' else 'hard_mix',
                       block=cfg.pmm.block_size, k=top_k)
    pictures = StagePictures(model, datamanager.transform_te,
                             cfg.pmm.block_size, top_k, device, rule=rule)
    partners = [[query[j] for j in draw_partners([it[1] for it in items],
                                                 pool_pids, gen)]
                for _ in range(pictures.num_stages - 1)]

    out_dir = args.output or osp.join(cfg.data.save_dir, 'gradcam')
    weights = cfg.model.load_weights or 'untrained'
    res = pictures.write(
        items, partners, out_dir, columns=args.sheet,
        title='{} on {} query: Grad-CAM per stage, top-{} blocks outlined '
        '(IoU: mean top-K IoU between stages)'.format(
            osp.basename(weights), name, top_k),
        prefixes=['q{:04d}'.format(i) for i in chosen])
    print('Wrote {} panels and the contact sheet "{}"'.format(
        len(res['panels']), res['sheet']))

    report = {
        'weights': weights, 'dataset': name, 'model': cfg.model.name,
        'block_size': list(cfg.pmm.block_size), 'top_k': top_k,
        'pictured': chosen,
    }
    if args.overlap_num >= 0:
        subset = query[:args.overlap_num] if args.overlap_num else query
        height, width = feature_map_size(
            model_backbone(cfg.model.name), cfg.data.height, cfg.data.width)
        blocks = (height // cfg.pmm.block_size[0]) * (width //
                                                      cfg.pmm.block_size[1])
        summary = pictures.overlap(subset, query, gen,
                                   batch_size=cfg.test.batch_size)
        summary['chance_mask_iou'] = chance_iou(blocks, top_k)
        print(format_overlap(summary, blocks, top_k))
        report['overlap'] = summary
    with atomic_write(osp.join(out_dir, 'overlap.json'), 'w') as f:
        json.dump(json_safe(report), f, indent=1, allow_nan=False)
    print('Saved "{}"'.format(osp.join(out_dir, 'overlap.json')))
    return report


def choose(args, query, name):
    """The query indices to picture (``--indices``, or ``--num`` drawn with
    ``--seed``)."""
    if args.indices:
        bad = [i for i in args.indices if not 0 <= i < len(query)]
        if bad:
            raise ValueError('--indices {}: the query set of {} has {} images '
                             '(0 to {})'.format(bad, name, len(query),
                                                len(query) - 1))
        return list(args.indices)
    if args.num > len(query):
        raise ValueError('--num {}: the query set of {} has {} images'.format(
            args.num, name, len(query)))
    gen = torch.Generator().manual_seed(args.seed)
    return sorted(torch.randperm(len(query), generator=gen)[:args.num].tolist())


def mask_pictures(args, cfg, model, datamanager, query, name, device):
    """FMN's mask or MagnifierNet's regions for the chosen queries."""
    from pmm_torchreid.mask_pictures import MaskPictures
    from pmm_torchreid.parsing import RegionSource
    chosen = choose(args, query, name)
    items = [query[i] for i in chosen]
    source = RegionSource(cfg.magnifiernet.masks_root, cfg.data.root,
                          cfg.magnifiernet.mask_labels,
                          cfg.magnifiernet.regions == 'bands')
    pictures = MaskPictures(model, datamanager.transform_te, device, source)
    out_dir = args.output or osp.join(cfg.data.save_dir, 'masks')
    weights = cfg.model.load_weights or 'untrained'
    what = 'FMN feature mask (jet: 0 blue .. 1 red)' \
        if pictures.kind == 'fmn' else \
        'MagnifierNet regions: head orange, upper red, lower blue, shoes purple'
    res = pictures.write(items, out_dir, columns=args.sheet,
                         title='{} on {} query: {}'.format(
                             osp.basename(weights), name, what),
                         prefixes=['q{:04d}'.format(i) for i in chosen])
    print('Wrote {} panels and the contact sheet "{}"'.format(
        len(res['panels']), res['sheet']))
    print('Mean over the pictured queries: {}'.format(', '.join(
        '{} {:.3f}'.format(k, v) for k, v in res['mean'].items())))
    report = {'weights': weights, 'dataset': name, 'model': cfg.model.name,
              'pictured': chosen, 'mean': res['mean'],
              'per_image': res['per_image']}
    with atomic_write(osp.join(out_dir, 'masks.json'), 'w') as f:
        json.dump(json_safe(report), f, indent=1, allow_nan=False)
    print('Saved "{}"'.format(osp.join(out_dir, 'masks.json')))
    return report


if __name__ == '__main__':
    main()
