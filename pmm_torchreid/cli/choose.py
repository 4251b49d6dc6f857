"""Choose a config value on validation identities carved out of the training set.

The command line of :mod:`pmm_torchreid.study.choose` (scripts/choose.py,
``pmm-choose``): ``--val-ids N`` training identities are held out
(``data.val_ids``); one run per value and seed trains on the rest and is
evaluated on them, never on the test split.  The value with the best mean
validation mAP is chosen; ``--out`` receives ``choice.json`` and
``chosen.yaml`` (the config with the chosen value, validation off), which
scripts/main.py and scripts/ablation.py take as they are.  Rerunning the same
command skips the finished runs and only chooses again.
"""
import argparse
import shlex
from typing import Optional, Sequence

from pmm_torchreid.study.ablation import AblationError, register_user_code
from pmm_torchreid.study.choose import DEFAULT_SEEDS, Chooser, held_out_note

__all__ = ['build_parser', 'main']


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog='Example: --config-file configs/pmm_cuhk01.yaml --root '
        'reid-data --key pmm.mix_ratio --values 0.0625 0.125 0.25 --val-ids '
        '100 --out log/choose_share',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--config-file', required=True,
                        help='the recipe (yaml)')
    parser.add_argument('--root', default='', help='path to data root')
    parser.add_argument('--key', required=True,
                        help='the config key to choose (e.g. pmm.mix_ratio, '
                        'train.max_epoch, train.lr; model.name sets PMM '
                        'against BDB, each trained as the ablation runner '
                        'trains it)')
    parser.add_argument('--values', nargs='+', required=True,
                        help='its values, 2 or more, as YAML/Python literals '
                        '(0.0625, 30, "[1, 1]", hard_mix); a model.name value '
                        'may carry ,KEY=VALUE options as the ablation '
                        'runner\'s settings do (bdb_osnet_x0_25,bdb.bands=4; '
                        'pmm_osnet_x0_25,pmm.mix=none)')
    parser.add_argument('--val-ids', type=int, required=True,
                        help='training identities held out for validation '
                        '(data.val_ids; at least 2, leaving 2 to train on)')
    parser.add_argument('--seeds', type=int, nargs='+',
                        default=list(DEFAULT_SEEDS),
                        help='training seeds of every value (two or more: '
                        'the spread over seeds says whether a lead is noise)')
    parser.add_argument('--out', required=True,
                        help='output folder: the runs, choice.json, '
                        'chosen.yaml')
    parser.add_argument('--jobs', type=int, default=1,
                        help='runs at the same time')
    parser.add_argument('--threads', type=int, default=0,
                        help='torch threads per run (OMP_NUM_THREADS); 0: '
                        'leave the default')
    parser.add_argument('--dry-run', action='store_true',
                        help='print the commands, run nothing')
    parser.add_argument('--register', action='append', default=[],
                        metavar='FILE_OR_MODULE',
                        help='imported here and by every run (scripts/main.py '
                        '--register), e.g. the file that registers your own '
                        'dataset (docs/OWN_DATA.md); repeatable')
    parser.add_argument('opts', nargs=argparse.REMAINDER,
                        help='KEY VALUE overrides for every run')
    return parser


def main(argv: Optional[Sequence[str]] = None,
         main_script: Optional[str] = None) -> int:
    """Runs the choice; ``main_script``: the path of scripts/main.py that
    every run is (without it, each run is ``pmm-train``'s main in
    ``python -c``)."""
    args = build_parser().parse_args(argv)
    if args.opts and args.opts[0] == '--':
        args.opts = args.opts[1:]
    if args.jobs < 1:
        raise SystemExit('error: --jobs must be >= 1, got {}'.format(
            args.jobs))
    try:
        register = register_user_code(args.register)
        chooser = Chooser(args.config_file, args.out, args.key, args.values,
                          args.val_ids, args.seeds, args.opts, root=args.root,
                          main_script=main_script, threads=args.threads,
                          register=register)
        if args.dry_run:
            for cmd in chooser.commands():
                print(shlex.join(cmd))
            return 0
        total = chooser.check_ids()
        for line in held_out_note(chooser.val_ids, total, chooser.queries):
            print(line)
        chooser.check_folder()
        return chooser.run(args.jobs)
    except AblationError as error:
        raise SystemExit('error: {}'.format(error))
