"""Read every image of the configured datasets once and list the bad ones.

The command line of ``scripts/check_dataset.py``.  Takes the same arguments as
scripts/main.py (config file, flags, KEY VALUE overrides), builds the source
and target datasets with torchreid, decodes each train/query/gallery image
exactly as training would (PIL, RGB), and reports every file that fails at the
end (:mod:`pmm_torchreid.data.check`).  Exit status: 0 when all images decode,
1 when some do not, 2 on a bad configuration, a missing dataset or one that
cannot list its images (e.g. a misnamed file of your own data).
"""
from __future__ import annotations

import argparse
import sys
import time

from pmm_torchreid import launch
from pmm_torchreid.config import checks
from pmm_torchreid.data.check import check_dataset, dataset_images

__all__ = ['build_parser', 'main']


def build_parser() -> argparse.ArgumentParser:
    parser = launch.build_parser()
    parser.description = __doc__.splitlines()[0]
    parser.add_argument('--workers', type=int, default=4,
                        help='threads that decode images')
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = launch.setup_config(args)
        checks.check_paths(cfg)
        start = time.time()
        # a dataset that cannot list its images (a misnamed file, a bad CSV
        # row of one's own data) is a bad dataset, not a crash
        lists = dataset_images(
            list(cfg.data.sources) + list(cfg.data.targets), cfg.data.root,
            cfg.data.split_id, cuhk03_labeled=cfg.cuhk03.labeled_images,
            cuhk03_classic_split=cfg.cuhk03.classic_split,
            market1501_500k=cfg.market1501.use_500k_distractors)
    except (KeyError, ValueError, ImportError, FileNotFoundError) as error:
        print('error: {}'.format(error.args[0] if error.args else error),
              file=sys.stderr)
        return 2
    paths, bad = check_dataset(lists, workers=args.workers)
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
