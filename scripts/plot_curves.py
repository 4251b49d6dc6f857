#!/usr/bin/env python
"""Draws the training curves a run writes to <save_dir>/curves.csv (PMM, BDB or
a torchreid engine run through scripts/main.py).

Four plots in one PNG: the loss of every stage (triplet and cross-entropy),
the training accuracy of every stage, the learning rate, and the evaluation
mAP / Rank-1.

Examples::

    python scripts/plot_curves.py log/pmm_demo                 # -> log/pmm_demo/curves.png
    python scripts/plot_curves.py log/pmm_demo/curves.csv -o curves.png
"""
import argparse
import os.path as osp
import sys

try:
    import pmm_torchreid  # noqa: F401  (installed: pip install -e .)
except ImportError:  # run from a source tree that is not installed
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from pmm_torchreid.checkpoint import atomic_write  # noqa: E402
from pmm_torchreid.curves import read_curves  # noqa: E402
from pmm_torchreid.visualize import stage_name  # noqa: E402


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('source', help='curves.csv, or the save_dir holding it')
    parser.add_argument('-o', '--output', default='',
                        help='PNG to write (default: curves.png next to the '
                        'CSV)')
    parser.add_argument('--title', default='', help='title of the figure')
    parser.add_argument('--dpi', type=int, default=100, help='resolution')
    return parser


def _suffixes(rows):
    """Column suffixes of the per-stage numbers: '1', '2', ... for PMM/BDB;
    '' for a torchreid engine's single head (loss_t, loss_x, acc)."""
    row = rows[0] if rows else {}
    count = 0
    while 'loss_x{}'.format(count + 1) in row:
        count += 1
    if count:
        return [str(s) for s in range(1, count + 1)]
    return [''] if any(k in row for k in ('loss_x', 'loss_t', 'acc')) else []


def plot(rows, output, title='', dpi=100):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    train = [r for r in rows if r['kind'] == 'train']
    test = [r for r in rows if r['kind'] == 'test']
    if not train and not test:
        raise ValueError('no training or evaluation rows to plot')
    colors = plt.get_cmap('tab10').colors
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax_loss, ax_acc, ax_lr, ax_eval = axes.ravel()
    epochs = [r['epoch'] for r in train]
    for i, suffix in enumerate(_suffixes(train or rows)):
        c = colors[i % len(colors)]
        name = stage_name(int(suffix)) if suffix else ''
        for key, style, label in (('loss_x', '-', 'cross-entropy'),
                                  ('loss_t', '--', 'triplet')):
            values = [r.get(key + suffix) for r in train]
            if any(v is not None for v in values):
                ax_loss.plot(epochs, values, style, color=c,
                             label='{} {}'.format(label, name).strip())
        values = [r.get('acc' + suffix) for r in train]
        if any(v is not None for v in values):
            ax_acc.plot(epochs, values, '-', color=c,
                        label='stage {}'.format(name) if name else 'accuracy')
    ax_loss.set_title('training losses per stage (epoch means)')
    ax_loss.set_xlabel('epoch')
    ax_loss.legend(fontsize=8, ncol=2)
    ax_acc.set_title('training accuracy per stage (mixed inputs for II, III)')
    ax_acc.set_xlabel('epoch')
    ax_acc.set_ylabel('%')
    ax_acc.legend(fontsize=8)
    ax_lr.plot(epochs, [r['lr'] for r in train], '-', color='k',
               drawstyle='steps-mid')
    ax_lr.set_title('learning rate')
    ax_lr.set_xlabel('epoch')
    ax_lr.ticklabel_format(axis='y', style='sci', scilimits=(-3, 3))
    datasets = sorted({r['dataset'] for r in test})
    for d, name in enumerate(datasets):
        pts = [r for r in test if r['dataset'] == name]
        c = colors[d % len(colors)]
        suffix = ' ({})'.format(name) if len(datasets) > 1 else ''
        ax_eval.plot([r['epoch'] for r in pts], [r['mAP'] for r in pts], 'o-',
                     color=c, label='mAP' + suffix)
        ax_eval.plot([r['epoch'] for r in pts], [r['rank1'] for r in pts],
                     's--', color=c, label='Rank-1' + suffix)
        for r in pts[-1:]:
            ax_eval.annotate('{:.1f}'.format(r['mAP']), (r['epoch'], r['mAP']),
                             textcoords='offset points', xytext=(4, -12),
                             fontsize=8)
            ax_eval.annotate('{:.1f}'.format(r['rank1']),
                             (r['epoch'], r['rank1']),
                             textcoords='offset points', xytext=(4, 4),
                             fontsize=8)
    ax_eval.set_title('evaluation' + (' on ' + datasets[0]
                                      if len(datasets) == 1 else ''))
    ax_eval.set_xlabel('epoch')
    ax_eval.set_ylabel('%')
    ax_eval.set_ylim(0, 100)
    if datasets:
        ax_eval.legend(fontsize=8)
    else:
        ax_eval.text(0.5, 0.5, 'no evaluation yet', ha='center',
                     transform=ax_eval.transAxes)
    for ax in axes.ravel():
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_write(output) as f:
            fig.savefig(f, dpi=dpi, format='png')
    finally:
        plt.close(fig)
    return output


def main(argv=None):
    args = build_parser().parse_args(argv)
    path = args.source
    if osp.isdir(path):
        path = osp.join(path, 'curves.csv')
    rows = read_curves(path)
    output = args.output or osp.join(osp.dirname(osp.abspath(path)),
                                     'curves.png')
    plot(rows, output, args.title, args.dpi)
    print('Saved "{}" ({} rows)'.format(output, len(rows)))
    return output


if __name__ == '__main__':
    main()
