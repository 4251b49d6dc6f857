#!/usr/bin/env python
"""Read every image of the configured datasets once and list the bad ones.

Takes the same arguments as scripts/main.py (config file, flags, KEY VALUE
overrides), builds the source and target datasets with torchreid, decodes
each train/query/gallery image exactly as training would (PIL, RGB), and
reports every file that fails at the end.  Exit status: 0 when all images
decode, 1 when some do not, 2 on a bad configuration or a missing dataset.

Examples::

    python scripts/check_dataset.py --config-file configs/pmm_cuhk03.yaml \\
        --root reid-data
    python scripts/check_dataset.py --config-file configs/pmm_demo.yaml \\
        --workers 8
"""
import os.path as osp
import sys
import time

try:
    import pmm_torchreid  # noqa: F401  (installed: pip install -e .)
except ImportError:  # run from a source tree that is not installed
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torchreid  # noqa: E402

from pmm_torchreid.launch import build_parser, setup_config  # noqa: E402
from pmm_torchreid import checks  # noqa: E402
from pmm_torchreid.data import find_bad_images  # noqa: E402


def dataset_images(cfg):
    """``{(dataset, split): [paths]}`` for the configured sources and targets."""
    lists = {}
    names = list(dict.fromkeys(list(cfg.data.sources) + list(cfg.data.targets)))
    for name in names:
        dataset = torchreid.data.datasets.init_image_dataset(
            name, transform=None, mode='train', root=cfg.data.root,
            split_id=cfg.data.split_id, combineall=False, verbose=False,
            cuhk03_labeled=cfg.cuhk03.labeled_images,
            cuhk03_classic_split=cfg.cuhk03.classic_split,
            market1501_500k=cfg.market1501.use_500k_distractors
        )
        for split in ('train', 'query', 'gallery'):
            lists[(name, split)] = [item[0] for item in getattr(dataset, split)]
    return lists


def main(argv=None) -> int:
    parser = build_parser()
    parser.description = __doc__.splitlines()[0]
    parser.add_argument('--workers', type=int, default=4,
                        help='threads that decode images')
    args = parser.parse_args(argv)
    try:
        cfg = setup_config(args)
        checks.check_paths(cfg)
    except (KeyError, ValueError, FileNotFoundError) as error:
        print('error: {}'.format(error.args[0] if error.args else error),
              file=sys.stderr)
        return 2
    start = time.time()
    lists = dataset_images(cfg)
    paths = sorted({p for items in lists.values() for p in items})
    bad = dict(find_bad_images(paths, workers=args.workers))
    for (name, split), items in lists.items():
        count = sum(p in bad for p in items)
        print('{:>16} {:<8} {:>7} images, {} bad'.format(
            name, split, len(items), count))
    print('read {} distinct images in {:.1f} s'.format(
        len(paths), time.time() - start))
    if not bad:
        print('all images decode')
        return 0
    print('\n{} bad image(s):'.format(len(bad)))
    for path in sorted(bad):
        print('  {}: {}'.format(path, bad[path]))
    print('\nFix or remove them, or train with data.skip_bad_images True to '
          'leave them out.')
    return 1


if __name__ == '__main__':
    sys.exit(main())
