"""The guidance functions on their own: grad_cam, block_mask, sample_negatives,
hard_mix, against hand-made inputs and the reference code's way."""
import pytest
import torch

from pmm_torchreid.models import PMM
from pmm_torchreid.models.guidance import (
    HardMix,
    block_mask,
    build_mixer,
    grad_cam,
    hard_mix,
    sample_negatives,
)


def _reference_grad_cam(model, images, labels):
    """The reference code's Grad-CAM: a hook on the feature map and a full
    backward through the whole network, parameters included."""
    grads = []
    fmap = model.backbone(images)
    fmap.register_hook(grads.append)
    logits, _ = model.global_head(fmap)
    logits.gather(1, labels.view(-1, 1)).sum().backward()
    weights = grads[0].mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * fmap.detach()).sum(1))


def test_grad_cam_matches_reference_and_leaves_grads_alone():
    torch.manual_seed(0)
    model = PMM(num_classes=5, backbone='resnet18', pretrained=False).train()
    images = torch.randn(6, 3, 64, 32)
    labels = torch.tensor([0, 0, 1, 1, 4, 4])
    # same BN batch statistics in both passes: freeze running stats updates
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fmap = model.backbone(images)
    logits, _ = model.global_head(fmap)
    cam = grad_cam(logits, fmap, labels)
    assert all(p.grad is None for p in model.parameters())
    assert cam.shape == (6, 4, 2) and not cam.requires_grad
    model.load_state_dict(state)
    expected = _reference_grad_cam(model, images, labels)
    assert any(p.grad is not None for p in model.parameters())
    torch.testing.assert_close(cam, expected, rtol=1e-5, atol=1e-5)
    assert cam.abs().sum() > 0  # not trivially equal


def test_grad_cam_is_relu_of_weighted_channels():
    fmap = torch.tensor([[[[1., 2.]], [[3., -4.]]]], requires_grad=True)
    w = torch.tensor([[2., -1.]])  # logits = pooled channels @ w.T
    logits = torch.cat([fmap.mean((2, 3)) @ w.T, torch.zeros(1, 1)], 1)
    cam = grad_cam(logits, fmap, torch.tensor([0]))
    # gradient per channel: w_c / (H*W) -> weights 1, -0.5
    expected = torch.relu(1 * fmap[0, 0] - 0.5 * fmap[0, 1]).detach()
    torch.testing.assert_close(cam, expected.view(1, 1, 2))


def test_grad_cam_needs_a_graph():
    with pytest.raises(ValueError, match='require grad'):
        grad_cam(torch.zeros(1, 2), torch.zeros(1, 1, 2, 2), torch.tensor([0]))


def test_block_mask_marks_the_hot_blocks():
    cam = torch.zeros(2, 6, 4)
    cam[0, 0:3, 2:4] = 5.0  # block (row 0, col 1)
    cam[0, 3:6, 0:2] = 1.0  # block (row 1, col 0)
    cam[1, 3:6, 2:4] = 2.0  # block (row 1, col 1)
    mask = block_mask(cam, (3, 2), 1)
    assert mask.shape == (2, 1, 6, 4)
    expected0 = torch.ones(6, 4)
    expected0[0:3, 2:4] = 0
    expected1 = torch.ones(6, 4)
    expected1[3:6, 2:4] = 0
    assert torch.equal(mask[0, 0], expected0)
    assert torch.equal(mask[1, 0], expected1)
    mask2 = block_mask(cam, (3, 2), 2)
    assert torch.equal(mask2[0, 0, 3:6, 0:2], torch.zeros(3, 2))
    assert int((mask2 == 0).sum()) == 2 * 2 * 6


def test_block_mask_ties_pick_the_first_blocks_in_row_major_order():
    cam = torch.ones(1, 4, 4)  # all four 2x2 blocks tie
    mask = block_mask(cam, (2, 2), 2)[0, 0]
    expected = torch.ones(4, 4)
    expected[0:2, :] = 0  # blocks 0 and 1 (the top row)
    assert torch.equal(mask, expected)


def test_block_mask_k_zero_and_all():
    cam = torch.rand(3, 4, 4)
    assert torch.equal(block_mask(cam, (2, 2), 0), torch.ones(3, 1, 4, 4))
    assert torch.equal(block_mask(cam, (2, 2), 4), torch.zeros(3, 1, 4, 4))


def test_block_mask_rejects_blocks_that_do_not_tile():
    with pytest.raises(ValueError, match=r'3x2 does not tile the 8x4.*\[1, 2, 4, 8\]'):
        block_mask(torch.rand(1, 8, 4), (3, 2), 1)
    with pytest.raises(ValueError, match='top-k = 5 blocks'):
        block_mask(torch.rand(1, 4, 4), (2, 2), 5)


def test_sample_negatives_never_returns_the_same_identity():
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([3, 3, 3, 7, 9, 9, 1])  # uneven layout
    for _ in range(200):
        neg = sample_negatives(labels, gen)
        assert neg.shape == labels.shape and neg.dtype == torch.long
        assert bool((labels[neg] != labels).all())


def test_sample_negatives_is_uniform_and_reproducible():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    draws = torch.stack([
        sample_negatives(labels, torch.Generator().manual_seed(5))
        for _ in range(2)
    ])
    assert torch.equal(draws[0], draws[1])
    gen = torch.Generator().manual_seed(1)
    picks = torch.stack([sample_negatives(labels, gen) for _ in range(6000)])
    # sample 0 (label 0) has 4 candidates: 2, 3, 4, 5, each ~1/4
    freq = torch.bincount(picks[:, 0], minlength=6).float() / 6000
    assert freq[:2].sum() == 0
    assert torch.allclose(freq[2:], torch.full((4, ), 0.25), atol=0.03)


def test_sample_negatives_single_identity_is_a_clear_error():
    with pytest.raises(ValueError, match='1 identity'):
        sample_negatives(torch.tensor([4, 4, 4, 4]))


def test_hard_mix_is_exact():
    x = torch.arange(3 * 2 * 2 * 2, dtype=torch.float).view(3, 2, 2, 2)
    x[2, 0, 0, 0] = float('inf')  # a partner's inf must not leak as nan
    mask = torch.ones(3, 1, 2, 2)
    mask[:, :, 0, :] = 0  # first row comes from the partner
    neg = torch.tensor([1, 2, 0])
    out = hard_mix(x, mask, neg)
    for i in range(3):
        assert torch.equal(out[i, :, 1, :], x[i, :, 1, :])
        assert torch.equal(out[i, :, 0, :], x[neg[i], :, 0, :])
    assert not torch.isnan(out).any()


def test_hard_mix_gradient_reaches_sample_and_partner():
    x = torch.randn(2, 1, 2, 1, requires_grad=True)
    mask = torch.tensor([1., 0.]).view(1, 1, 2, 1).expand(2, 1, 2, 1)
    hard_mix(x, mask, torch.tensor([1, 0])).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_hard_mix_shape_errors():
    with pytest.raises(ValueError, match='does not fit'):
        hard_mix(torch.zeros(2, 3, 4, 4), torch.ones(2, 1, 4, 2),
                 torch.tensor([1, 0]))
    with pytest.raises(ValueError, match='one index per sample'):
        hard_mix(torch.zeros(2, 3, 4, 4), torch.ones(2, 1, 4, 4),
                 torch.tensor([1]))


def test_build_mixer():
    assert build_mixer('none') is None
    assert isinstance(build_mixer('hard_mix', (2, 1), 3), HardMix)
    with pytest.raises(ValueError, match="pmm.mix = 'mixup'"):
        build_mixer('mixup')
