"""The mixed stages under ``nn.DataParallel``, without GPUs.

DataParallel splits a batch into shares, runs one replica per share and
gathers the outputs along dim 0, unchanged.  A partner *index* drawn inside a
replica points into that replica's share, so looking it up in the whole
batch's labels (what the engine did before) gives the wrong partner label to
every share but the first.  Here two halves of a batch go through the model
as two replicas would (each with its own labels and its own partner draws),
the outputs are gathered as DataParallel gathers them, and the engine's loss
must use, for every sample, the label of a partner from its own half.
"""
import types

import pytest
import torch

from pmm_torchreid.engine import PMMEngine
from pmm_torchreid.engine.losses import mixed_cross_entropy
from pmm_torchreid.models import PMM
from pmm_torchreid.models.guidance import build_mixer


def dp_gather(outputs):
    """``torch.nn.parallel.gather`` on the CPU: the same recursion over
    dicts, lists and None, with tensors concatenated along dim 0 (its Gather
    refuses CPU tensors)."""
    out = outputs[0]
    if isinstance(out, torch.Tensor):
        return torch.cat(outputs, dim=0)
    if out is None:
        return None
    if isinstance(out, dict):
        return type(out)((k, dp_gather([d[k] for d in outputs])) for k in out)
    return type(out)(map(dp_gather, zip(*outputs)))


def recording(rule):
    """``rule`` with the partner indices it draws kept in ``rule.drawn``."""
    rule.drawn = []
    draw = rule.partners
    rule.partners = lambda labels: rule.drawn.append(draw(labels)) or \
        rule.drawn[-1]
    return rule


def replicas(mix):
    torch.manual_seed(0)
    model = PMM(6, backbone='resnet18', pretrained=False).train()
    images = torch.randn(8, 3, 64, 32)
    pids = torch.tensor([0, 0, 1, 1, 4, 4, 5, 5])  # halves: {0, 1}, {4, 5}
    outs, rules = [], []
    for half, seed in ((slice(0, 4), 1), (slice(4, 8), 2)):
        rule = recording(build_mixer(
            mix, block=(2, 1), k=2, generator=torch.Generator().manual_seed(
                seed)))
        outs.append(model(images[half], pids[half], mixer=rule))
        rules.append(rule)
    engine = PMMEngine(types.SimpleNamespace(train_loader=None, test_loader={}),
                       model, torch.optim.SGD(model.parameters(), lr=0.0),
                       use_gpu=False, mix=mix, block_size=(2, 1), top_k=2)
    return engine, dp_gather(outs), pids, rules


@pytest.mark.parametrize('mix', ['cutmix', 'a_cutmix'])
def test_gathered_replicas_mix_labels_within_their_own_share(mix):
    engine, out, pids, rules = replicas(mix)
    halves = (pids[:4], pids[4:])
    _, summary = engine.stage_losses(out, pids)
    for s in (2, 3):
        partner = out['partner_labels'][s - 2]
        weight = out['partner_weights'][s - 2]
        assert partner.shape == pids.shape and bool((weight > 0).all())
        # every sample's partner: another identity of its own half
        for i in range(8):
            own_half = halves[i // 4]
            assert int(partner[i]) in own_half.tolist(), (s, i)
            assert int(partner[i]) != int(pids[i])
        # exactly the labels each replica drew, in its own share
        right = torch.cat([h[r.drawn[s - 2]] for h, r in zip(halves, rules)])
        assert torch.equal(partner, right)
        logits = out['logits'][s - 1]
        want = mixed_cross_entropy(logits, pids, right, weight, 0.1).item()
        assert summary['loss_x{}'.format(s)] == pytest.approx(want, rel=1e-6)

        # the old index-based path: replica-local indices looked up in the
        # whole batch give the second half partners from the first half
        indices = torch.cat([r.drawn[s - 2] for r in rules])
        old = pids.index_select(0, indices)
        assert set(old[4:].tolist()) <= set(halves[0].tolist())
        assert not torch.equal(old, right)
        wrong = mixed_cross_entropy(logits, pids, old, weight, 0.1).item()
        assert abs(wrong - want) > 1e-4


def test_gathered_hard_mix_keeps_the_own_labels():
    engine, out, pids, rules = replicas('hard_mix')
    _, summary = engine.stage_losses(out, pids)
    for s in (2, 3):
        assert torch.equal(out['partner_weights'][s - 2], torch.zeros(8))
        own = engine.label_smooth
        from pmm_torchreid.engine.losses import smoothed_cross_entropy
        want = smoothed_cross_entropy(out['logits'][s - 1], pids, own).item()
        assert summary['loss_x{}'.format(s)] == pytest.approx(want, rel=1e-6)


def test_rules_that_paste_nothing_give_no_partner_labels():
    _, out, _, _ = replicas('cutout')
    assert out['partner_labels'] == [None, None]  # gathered None stays None
