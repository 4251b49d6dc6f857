"""Plots of the training curves a run writes to ``<save_dir>/curves.csv``
(``scripts/plot_curves.py``; the rows are
:func:`pmm_torchreid.engine.curves.read_curves`'s).

Four plots in one PNG: the loss of every stage (triplet and cross-entropy),
the training accuracy of every stage, the learning rate, and the evaluation
mAP / Rank-1.  matplotlib is an optional dependency, imported when a plot is
drawn.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

from pmm_torchreid.utils.io import atomic_write
from pmm_torchreid.visualize.drawing import stage_name

__all__ = ['stage_suffixes', 'plot']


def stage_suffixes(rows: Sequence[Dict]) -> List[str]:
    """Column suffixes of the per-stage numbers: '1', '2', ... for PMM/BDB;
    '' for a torchreid engine's single head (loss_t, loss_x, acc)."""
    row = rows[0] if rows else {}
    count = 0
    while 'loss_x{}'.format(count + 1) in row:
        count += 1
    if count:
        return [str(s) for s in range(1, count + 1)]
    return [''] if any(k in row for k in ('loss_x', 'loss_t', 'acc')) else []


def plot(rows: Sequence[Dict], output: str, title: str = '',
         dpi: int = 100) -> str:
    """Draws ``rows`` (``curves.csv``'s, as ``read_curves`` gives them) into
    the PNG ``output`` (written atomically); returns ``output``.

    Raises:
        ValueError: no training or evaluation row.
    """
    # lazy: matplotlib is optional (and slow to import)
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # lazy: as above
    from matplotlib.ticker import MaxNLocator  # lazy: as above

    train = [r for r in rows if r['kind'] == 'train']
    test = [r for r in rows if r['kind'] == 'test']
    if not train and not test:
        raise ValueError('no training or evaluation rows to plot')
    colors = plt.get_cmap('tab10').colors
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax_loss, ax_acc, ax_lr, ax_eval = axes.ravel()
    epochs = [r['epoch'] for r in train]
    for i, suffix in enumerate(stage_suffixes(train or rows)):
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
