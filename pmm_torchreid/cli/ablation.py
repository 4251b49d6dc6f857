"""Run (model, mix) settings with one recipe and the same seeds; tabulate them.

The command line of :mod:`pmm_torchreid.study.ablation` (scripts/ablation.py):
every run is ``[sys.executable, main_script, ...]``, where ``main_script`` is
the path of scripts/main.py that the script passes in.

A setting is ``MODEL[:MIX][,KEY=VALUE...]``: ``pmm_osnet_x0_25:hard_mix``,
``bdb_osnet_x0_25`` (BDB trains with ``pmm.mix none``, and so do the
comparison systems ``fmn_*`` and ``magnifiernet_*``), ``osnet_x0_25``
(a torchreid model: torchreid's triplet engine, ``loss.name triplet``), or
``pmm_resnet18:hard_mix,model.pretrained=False``.
"""
import argparse
import sys
from typing import Optional, Sequence

from pmm_torchreid.config import get_default_config, merge_file
from pmm_torchreid.study.ablation import (
    Ablation,
    AblationError,
    Setting,
    check_data,
    check_overrides,
    check_settings,
    check_splits,
    register_user_code,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--config-file', required=True,
                        help='the shared recipe (yaml)')
    parser.add_argument('--root', default='', help='path to data root')
    parser.add_argument('--out', required=True, help='output folder')
    parser.add_argument('--settings', nargs='+', required=True,
                        help='MODEL[:MIX][,KEY=VALUE...] (see above)')
    parser.add_argument('--seeds', type=int, nargs='+', default=[1, 2, 3])
    parser.add_argument('--splits', type=int, nargs='+', default=None,
                        help="data.split_id values; none given: the config's")
    parser.add_argument('--jobs', type=int, default=1,
                        help='runs at the same time')
    parser.add_argument('--threads', type=int, default=0,
                        help='torch threads per run (OMP_NUM_THREADS); 0: '
                        'leave the default')
    parser.add_argument('--reference', default='',
                        help='the setting the paired differences are taken '
                        'against (default: the first)')
    parser.add_argument('--dry-run', action='store_true',
                        help='print the commands, run nothing')
    parser.add_argument('--table-only', action='store_true',
                        help='run nothing: rewrite table.md, results.json and '
                        'results.csv from the finished runs of --settings in '
                        '--out (also when the recipe check would refuse the '
                        'folder, e.g. for another --reference)')
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
    """Runs the ablation; ``main_script``: the path of scripts/main.py."""
    if not main_script:
        raise TypeError('main(): main_script, the path of scripts/main.py, '
                        'is required')
    args = build_parser().parse_args(argv)
    if args.opts and args.opts[0] == '--':
        args.opts = args.opts[1:]
    if len(args.opts) % 2:
        raise SystemExit('error: overrides must be KEY VALUE pairs, got '
                         '{}'.format(args.opts))
    if args.jobs < 1:
        raise SystemExit('error: --jobs must be >= 1, got {}'.format(
            args.jobs))
    for flag, given in (('--settings', args.settings), ('--seeds', args.seeds),
                        ('--splits', args.splits or [])):
        twice = sorted({str(x) for x in given if given.count(x) > 1})
        if twice:
            raise SystemExit('error: {} gives {} more than once (each run '
                             'has one folder)'.format(flag, ', '.join(twice)))
    try:
        settings = [Setting(spec) for spec in args.settings]
        slugs = [setting.slug for setting in settings]
        for i, slug in enumerate(slugs):
            if slug in slugs[:i]:
                raise AblationError('--settings {!r} and {!r} would share the '
                                    'run folder {!r}'.format(
                                        settings[slugs.index(slug)].spec,
                                        settings[i].spec, slug))
        if args.reference and args.reference not in args.settings:
            raise AblationError('--reference {!r} is not one of --settings '
                                '{}'.format(args.reference, args.settings))
        register = register_user_code(args.register)
        check_overrides(settings, args.opts)
        check_settings(settings, args.config_file, args.opts)
        split = int(merge_file(get_default_config(),
                               args.config_file).data.split_id)
        if args.splits is None:
            args.splits = [split]
        elif split not in args.splits:
            print('note: {} has data.split_id {}; these runs use --splits {}'
                  .format(args.config_file, split,
                          ' '.join(map(str, args.splits))), file=sys.stderr)
        study = Ablation(main_script, args.config_file, args.out, settings,
                         args.splits, args.seeds, args.opts, root=args.root,
                         threads=args.threads, reference=args.reference,
                         register=register)
        found = None
        if not (args.dry_run or args.table_only):
            found = check_splits(args.config_file, args.opts, args.root,
                                 args.splits)
        if args.dry_run:
            for cmd in study.commands():
                print(' '.join(cmd))
            return 0
        if args.table_only:  # the folder's own recipe, not re-checked
            study.use_folder_recipe()
        else:
            study.check_recipe()
            check_data(args.out, found)
    except AblationError as error:
        raise SystemExit('error: {}'.format(error))
    todo = study.pending()
    if args.table_only:
        print(study.write())
        return 0
    return study.run(todo, args.jobs)
