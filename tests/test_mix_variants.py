"""The ablation's mixing rules (cutout, cutmix, a_cutmix, batch_drop) and the
mixed-target cross-entropy, exactly, on hand-made tensors."""
import pytest
import torch
import torch.nn.functional as F
from helpers import batch, pmm_engine

from pmm_torchreid.engine.losses import mixed_cross_entropy, mixed_targets, smoothed_cross_entropy
from pmm_torchreid.models.guidance import (
    MIX_MODES,
    ACutMix,
    BatchDrop,
    CutMix,
    CutoutMix,
    HardMix,
    RandomMix,
    build_mixer,
    random_block_mask,
    replaced_fraction,
)

# 4 samples, 2 identities; a 4 x 2 map cut into 2 x 1 blocks: 4 blocks
# (top-left, top-right, bottom-left, bottom-right in row-major order)
LABELS = torch.tensor([0, 0, 1, 1])
BLOCK = (2, 1)
HOT = [0, 3, 1, 2]  # the hottest block of each sample's CAM


def _cam_inputs():
    """A map and logits whose Grad-CAM is ``relu(map)``: every logit is the
    sum of the (single-channel) map, so the gradient is 1 everywhere."""
    cam_map = torch.zeros(4, 1, 4, 2)
    for i, b in enumerate(HOT):
        r, c = divmod(b, 2)
        cam_map[i, 0, 2 * r:2 * r + 2, c] = 1.0 + i  # one hot block each
    cam_map.requires_grad_()
    logits = cam_map.sum(dim=(1, 2, 3)).view(-1, 1).expand(4, 2) * 1.0
    return cam_map, logits


def _part():
    """Part map whose every value tells its sample, channel and position."""
    idx = torch.arange(4 * 3 * 4 * 2, dtype=torch.float32)
    return idx.view(4, 3, 4, 2) + 1.0  # no zeros, all distinct


def _block_region(b):
    r, c = divmod(b, 2)
    return slice(2 * r, 2 * r + 2), c


def _run(rule, k=1):
    """The rule on the hand-made inputs, its negatives and the paste that
    sample ``i`` should show, block ``blocks[i]`` taken from ``source[i]``."""
    cam_map, logits = _cam_inputs()
    part = _part()
    out = rule(BLOCK, k=k, generator=torch.Generator().manual_seed(0))(
        part, cam_map, logits, LABELS)

    def pasted(blocks, source):
        expected = part.clone()
        for i, b in enumerate(blocks):
            rows, col = _block_region(b)
            expected[i, :, rows, col] = 0.0 if source is None else \
                part[source[i], :, rows, col]
        return expected

    return out, pasted


def test_every_variant_is_a_pmm_mix_mode():
    assert set(MIX_MODES) == {'hard_mix', 'random_mix', 'cutout', 'cutmix',
                              'a_cutmix', 'batch_drop', 'none'}
    for mode, cls in [('hard_mix', HardMix), ('random_mix', RandomMix),
                      ('cutout', CutoutMix),
                      ('cutmix', CutMix), ('a_cutmix', ACutMix),
                      ('batch_drop', BatchDrop)]:
        rule = build_mixer(mode, (2, 1), 3)
        assert type(rule) is cls and rule.block == (2, 1) and rule.k == 3
    with pytest.raises(ValueError, match="pmm.mix = 'mixup'.*cutmix"):
        build_mixer('mixup')


def test_cutout_zeroes_the_most_salient_block_and_keeps_the_label():
    out, pasted = _run(CutoutMix)
    expected = pasted(HOT, None)
    assert torch.equal(out.features, expected)
    assert torch.equal(out.mask, (expected[:, :1] != 0).float())
    assert out.negatives is None
    assert torch.equal(out.partner_weight, torch.zeros(4))


def test_hard_mix_pastes_a_negative_into_the_same_salient_block():
    out, pasted = _run(HardMix)
    neg = out.negatives
    assert (LABELS[neg] != LABELS).all()
    assert torch.equal(out.features, pasted(HOT, neg))
    assert torch.equal(out.partner_weight, torch.zeros(4))


def test_a_cutmix_pastes_the_partners_most_salient_block_and_mixes_labels():
    out, pasted = _run(ACutMix)
    neg = out.negatives
    assert (LABELS[neg] != LABELS).all()
    partner_hot = [HOT[int(j)] for j in neg]  # the PARTNER's hot block
    assert torch.equal(out.features, pasted(partner_hot, neg))
    assert torch.allclose(out.partner_weight, torch.full((4, ), 0.25))
    # the mask is the partner's top-1 mask (HOT differs between samples, so
    # it is never the sample's own)
    for i in range(4):
        rows, col = _block_region(HOT[int(neg[i])])
        want = torch.ones(1, 4, 2)
        want[0, rows, col] = 0.0
        assert torch.equal(out.mask[i], want)


def test_cutmix_pastes_k_random_blocks_of_a_negative_with_area_weights():
    part = _part()
    gen = torch.Generator().manual_seed(3)
    out = CutMix(BLOCK, k=2, generator=gen)(part, None, None, LABELS)
    neg = out.negatives
    assert (LABELS[neg] != LABELS).all()
    mask = out.mask
    # block-aligned, exactly 2 of the 4 blocks per sample
    blocks = mask[:, 0].view(4, 2, 2, 2).amax(dim=2)  # rows of blocks
    assert torch.equal(mask[:, 0], blocks.repeat_interleave(2, dim=1))
    assert (blocks.flatten(1) == 0).sum(1).tolist() == [2, 2, 2, 2]
    expected = torch.where(mask.bool(), part, part[neg])
    assert torch.equal(out.features, expected)
    assert torch.allclose(out.partner_weight, torch.full((4, ), 0.5))
    # the draw is per sample: over a few batches the masks differ
    masks = [CutMix(BLOCK, 2, torch.Generator().manual_seed(s))(
        part, None, None, LABELS).mask for s in range(5)]
    assert any(not torch.equal(m[0], m[1]) for m in masks)


def test_random_mix_pastes_random_blocks_of_a_negative_and_keeps_the_label():
    """A-Hard-Mix without the guidance: CutMix's blocks and partners (same
    draws), a negative's features, the sample's own label, the share
    honoured; the Grad-CAM inputs are never looked at."""
    part = _part()
    out = RandomMix(BLOCK, k=2, generator=torch.Generator().manual_seed(3))(
        part, None, None, LABELS)  # no Grad-CAM inputs: random blocks
    cut = CutMix(BLOCK, k=2, generator=torch.Generator().manual_seed(3))(
        part, None, None, LABELS)
    assert (LABELS[out.negatives] != LABELS).all()
    assert torch.equal(out.negatives, cut.negatives)
    assert torch.equal(out.mask, cut.mask)
    assert torch.equal(out.features, cut.features)
    assert torch.equal(out.features,
                       torch.where(out.mask.bool(), part, part[out.negatives]))
    assert torch.equal(out.partner_weight, torch.zeros(4))  # label kept
    # the share: a ratio of the grid's 4 blocks, per sample
    for ratio, blocks in ((0.25, 1), (0.5, 2), (0.75, 3)):
        mask = RandomMix(BLOCK, ratio=ratio, generator=torch.Generator()
                         .manual_seed(0))(part, None, None, LABELS).mask
        replaced = (mask[:, 0] == 0).flatten(1).sum(1)
        assert replaced.tolist() == [blocks * 2] * 4  # blocks of 2 cells
    # random: over draws the blocks move, and they are not HardMix's
    masks = [RandomMix(BLOCK, 1, torch.Generator().manual_seed(s))(
        part, None, None, LABELS).mask for s in range(6)]
    assert len({tuple(m[0].flatten().tolist()) for m in masks}) > 1


def test_random_mix_trains_with_the_anchors_label_only():
    """Through the engine: the mixed stages' cross-entropy is the plain
    label-smoothed one (no partner share in the target)."""
    engine = pmm_engine(mix='random_mix')
    seen = {}
    model = engine.model
    real = model.forward

    def keep(*args, **kwargs):
        out = real(*args, **kwargs)
        seen['out'] = out
        return out
    model.forward = keep
    summary = engine.forward_backward(batch())
    out = seen['out']
    assert len(out['partner_weights']) == 2
    assert all(torch.equal(w, torch.zeros_like(w))
               for w in out['partner_weights'])
    assert all(torch.isfinite(torch.tensor(v)) for v in summary.values())


def test_cutmix_needs_no_grad_cam():
    part = _part()
    out = CutMix(BLOCK, 1, torch.Generator().manual_seed(0))(
        part, torch.zeros(4, 1, 4, 2), torch.zeros(4, 2), LABELS)
    assert out.features.shape == part.shape  # no grad needed on the inputs


def test_batch_drop_zeroes_the_same_blocks_for_the_whole_batch():
    part = _part()
    seen = set()
    for seed in range(20):
        out = BatchDrop(BLOCK, k=1, generator=torch.Generator().manual_seed(
            seed))(part, None, None, LABELS)
        assert torch.equal(out.mask, out.mask[:1].expand_as(out.mask))
        assert int((out.mask[0, 0] == 0).sum()) == 2  # one 2 x 1 block
        assert torch.equal(out.features, part * out.mask)
        assert out.negatives is None
        assert torch.equal(out.partner_weight, torch.zeros(4))
        seen.add(tuple(out.mask[0, 0].flatten().tolist()))
    assert len(seen) == 4  # every block gets dropped for some batch


def test_random_block_mask_and_replaced_fraction():
    gen = torch.Generator().manual_seed(0)
    mask = random_block_mask(6, 6, 4, (3, 2), 2, gen)
    assert mask.shape == (6, 1, 6, 4)
    assert torch.equal(replaced_fraction(mask), torch.full((6, ), 0.5))
    with pytest.raises(ValueError, match='top-k = 5 blocks'):
        random_block_mask(1, 6, 4, (3, 2), 5)
    assert torch.equal(random_block_mask(2, 4, 2, (2, 1), 0), torch.ones(
        2, 1, 4, 2))


# --------------------------------------------------------------------------
# mixed-target cross-entropy
# --------------------------------------------------------------------------
def test_mixed_targets_rows_sum_to_one_and_weigh_both_labels():
    labels = torch.tensor([0, 2, 1])
    partners = torch.tensor([1, 0, 1])
    weight = torch.tensor([0.25, 0.5, 0.0])
    t = mixed_targets(labels, partners, weight, num_classes=4, epsilon=0.1)
    assert torch.allclose(t.sum(1), torch.ones(3))
    base = 0.1 / 4
    assert torch.allclose(t[0], torch.tensor(
        [0.9 * 0.75 + base, 0.9 * 0.25 + base, base, base]))
    assert torch.allclose(t[1], torch.tensor(
        [0.9 * 0.5 + base, base, 0.9 * 0.5 + base, base]))
    assert torch.allclose(t[2], torch.tensor([base, 0.9 + base, base, base]))


def test_mixed_cross_entropy_is_the_weighted_sum_of_two_smoothed_losses():
    torch.manual_seed(0)
    logits = torch.randn(5, 7)
    labels = torch.tensor([0, 1, 2, 3, 4])
    partners = torch.tensor([6, 5, 4, 3, 2])
    weight = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    got = mixed_cross_entropy(logits, labels, partners, weight, 0.1)
    own = F.cross_entropy(logits, labels, label_smoothing=0.1,
                          reduction='none')
    other = F.cross_entropy(logits, partners, label_smoothing=0.1,
                            reduction='none')
    assert torch.allclose(got, ((1 - weight) * own + weight * other).mean())
    zero = mixed_cross_entropy(logits, labels, partners, torch.zeros(5), 0.1)
    assert torch.allclose(zero, smoothed_cross_entropy(logits, labels, 0.1))
