"""``test.rerank True`` reaches torchreid's k-reciprocal re-ranking (Zhong et
al., CVPR 2017) through the plugin's evaluation path: scripts/main.py's main,
the run-records engine and its fast ranking, on the synthetic data."""
import re
import sys

import numpy as np
import torchreid
from helpers import in_process, main_args

from pmm_torchreid.cli.train import main
from pmm_torchreid.engine import records

#: helpers.SMALL evaluates 20 held-out identities, not 90: 40 queries (one
#: camera of each) and 120 gallery images (its other three cameras)
FEW = ['data.val_ids', '20', 'data.check_images', 'False']

def _printed(out):
    """``(mAP, {rank: CMC})`` in percent, as the evaluation printed them."""
    mAP = float(re.findall(r'mAP: ([\d.]+)%', out)[-1])
    cmc = {int(r): float(v) for r, v in re.findall(r'Rank-(\d+)\s*: ([\d.]+)%',
                                                    out)}
    return mAP, cmc


def test_rerank_reaches_torchreids_re_ranking(synthetic_root, tmp_path,
                                              monkeypatch):
    engine_module = sys.modules[torchreid.engine.Engine.__module__]
    ranked, reranked = [], []  # what the ranking got; re-ranking's in and out
    rank, rerank = records.evaluate_rank, engine_module.re_ranking

    def spy_rank(distmat, *args, **kwargs):
        ranked.append(np.array(distmat, copy=True))
        return rank(distmat, *args, **kwargs)

    def spy_rerank(q_g, q_q, g_g, *args, **kwargs):
        out = rerank(q_g, q_q, g_g, *args, **kwargs)
        reranked.append((np.array(q_g, copy=True), np.array(out, copy=True)))
        return out

    monkeypatch.setattr(records, 'evaluate_rank', spy_rank)
    monkeypatch.setattr(engine_module, 're_ranking', spy_rerank)
    printed = {}
    for flag in ('False', 'True'):  # the same untrained PMM (seeded) twice
        proc = in_process(main, main_args(
            synthetic_root, str(tmp_path / flag), 'test.evaluate', 'True',
            'test.rerank', flag, *FEW))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ('Applying person re-ranking' in proc.stdout) == (flag == 'True')
        printed[flag] = _printed(proc.stdout)

    # one re-ranking, of exactly the distances the plain run ranked, and its
    # output is what the ranking got
    assert len(ranked) == 2 and len(reranked) == 1
    plain, after = ranked
    assert plain.shape == after.shape == (40, 120)
    np.testing.assert_array_equal(reranked[0][0], plain)
    np.testing.assert_array_equal(reranked[0][1], after)
    assert np.isfinite(after).all() and (after >= 0).all()
    # the distances and the rankings change
    assert not np.allclose(plain, after)
    changed = (np.argsort(plain, 1, kind='stable')[:, :10] !=
               np.argsort(after, 1, kind='stable')[:, :10]).any(1)
    assert changed.mean() > 0.5, changed.mean()

    for flag, (mAP, cmc) in printed.items():
        assert 0 < mAP <= 100, flag
        assert sorted(cmc) == [1, 5, 10, 20], flag
        values = [cmc[r] for r in sorted(cmc)]
        assert all(0 <= v <= 100 for v in values), flag
        assert values == sorted(values), flag  # a CMC curve never falls
    assert printed['True'] != printed['False']
