"""Grad-CAM guidance and A-Hard-Mix: the operations PMM adds between its stages.

Every function works on whole batches (no per-sample Python loop) and on any
feature-map size that the block size divides.  Shapes use ``N`` for the batch,
``C`` for channels and ``H x W`` for the spatial size of the feature map.

The method (Zhang et al., ICASSP 2021, arXiv 2007.08779; the README's "Inside
the training step" gives the details the paper leaves open): a later stage
sees the part map ``P`` with the ``k`` most salient blocks of the previous
stage (by Grad-CAM) replaced by the same blocks of a sample of another
identity.  The paper's ablation variants (``cutout``, ``cutmix``, ``a_cutmix``,
``batch_drop``) are rules of the same shape (:class:`MixRule`).
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    'grad_cam', 'block_mask', 'random_block_mask', 'replaced_fraction',
    'sample_negatives', 'hard_mix', 'Mixed', 'MixRule', 'HardMix', 'RandomMix',
    'CutoutMix', 'CutMix', 'ACutMix', 'BatchDrop', 'MIX_RULES', 'MIX_MODES',
    'build_mixer',
    'check_block_grid', 'blocks_for_ratio', 'BlockChoice', 'with_partners'
]


def grad_cam(
    logits: torch.Tensor, feature_map: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Grad-CAM of the true-class logits at ``feature_map``.

    The gradient of ``sum_i logits[i, labels[i]]`` with respect to
    ``feature_map`` is taken with :func:`torch.autograd.grad`, so only the part
    of the graph between ``feature_map`` and ``logits`` is traversed (the head,
    never the backbone) and no parameter's ``.grad`` is touched.  The graph is
    retained for the training loss.

    Args:
        logits (Tensor): N x num_classes, computed from ``feature_map``.
        feature_map (Tensor): N x C x H x W, must require grad.
        labels (Tensor): N integer class indices.

    Returns:
        Tensor: N x H x W float32, ``ReLU(sum_c w_c * feature_map_c)`` with
        ``w = mean over H, W of the gradient``, computed in float32 (also
        under mixed precision); detached (it guides, it never trains).

    Examples::

        >>> fmap = backbone(images)              # N x C x H x W
        >>> logits, _ = head(fmap)
        >>> cam = grad_cam(logits, fmap, pids)   # N x H x W
    """
    if feature_map.dim() != 4:
        raise ValueError(
            'grad_cam: feature_map must be N x C x H x W, got shape {}'.format(
                tuple(feature_map.shape)
            )
        )
    if not feature_map.requires_grad:
        raise ValueError(
            'grad_cam: feature_map does not require grad, so the logits carry '
            'no gradient to it; call feature_map.requires_grad_() before the '
            'head runs'
        )
    labels = labels.to(device=logits.device, dtype=torch.long)
    score = logits.gather(1, labels.view(-1, 1)).sum()
    (grad, ) = torch.autograd.grad(score, feature_map, retain_graph=True)
    with torch.no_grad():  # in float32 even under autocast: it ranks blocks
        weights = grad.float().mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * feature_map.detach().float()).sum(dim=1))
    return cam


def check_block_grid(
    height: int, width: int, block: Sequence[int], k: Optional[int] = None
) -> Tuple[int, int]:
    """Checks that ``block`` tiles an ``height x width`` map (and ``k`` fits).

    Returns:
        tuple: the number of block rows and block columns.

    Raises:
        ValueError: naming the sizes, and the block sizes that would fit.
    """
    if len(block) != 2:
        raise ValueError(
            'block size must be (height, width), got {!r}'.format(block)
        )
    bh, bw = int(block[0]), int(block[1])
    if bh < 1 or bw < 1 or height % bh != 0 or width % bw != 0:
        heights = [d for d in range(1, height + 1) if height % d == 0]
        widths = [d for d in range(1, width + 1) if width % d == 0]
        raise ValueError(
            'block size {}x{} does not tile the {}x{} feature map; block '
            'heights that divide {} are {} and block widths that divide {} '
            'are {}'.format(bh, bw, height, width, height, heights, width,
                            widths)
        )
    rows, cols = height // bh, width // bw
    if k is not None and not 0 <= k <= rows * cols:
        raise ValueError(
            'top-k = {} blocks is not possible: a {}x{} map in {}x{} blocks has '
            '{} blocks'.format(k, height, width, bh, bw, rows * cols)
        )
    return rows, cols


def blocks_for_ratio(num_blocks: int, ratio: float) -> int:
    """How many of ``num_blocks`` blocks make the share ``ratio`` of the map:
    ``ratio * num_blocks`` rounded to the nearest whole block (halves up).

    Raises:
        ValueError: the share rounds to no block (nothing would be mixed) or
            to every block (nothing of the sample would be left).

    Examples::

        >>> blocks_for_ratio(32, 0.094)   # the released code's 3 of 32
        3
        >>> blocks_for_ratio(16, 0.094)   # 1.5 blocks round up
        2
    """
    k = int(math.floor(ratio * num_blocks + 0.5))
    if k < 1:
        raise ValueError(
            'mix ratio {} of {} blocks rounds to 0 blocks, so nothing would '
            'be mixed; use at least {:.3g} (one block), a smaller block size, '
            'or pmm.mix none'.format(ratio, num_blocks, 0.5 / num_blocks))
    if k >= num_blocks:
        raise ValueError(
            'mix ratio {} of {} blocks rounds to all {} blocks, so nothing of '
            'the sample would be left; use less than {:.3g}'.format(
                ratio, num_blocks, num_blocks,
                (num_blocks - 0.5) / num_blocks))
    return k


#: Blocks replaced per sample unless a config says otherwise: the released
#: code's K on every dataset (3 of 32 blocks; the paper's text says 3 / 6 / 8,
#: and larger shares lost in our study: README, "How much to mix").
DEFAULT_TOP_K = 3


class BlockChoice(NamedTuple):
    """How much of a map a rule replaces: ``k`` blocks of ``block`` size, or,
    with ``ratio``, that share of the blocks the map is cut into
    (:func:`blocks_for_ratio`).  The one place that turns ``pmm.top_k`` /
    ``pmm.mix_ratio`` into a number of blocks.

    Examples::

        >>> BlockChoice((1, 1), k=4).count(8, 4)
        4
        >>> BlockChoice((1, 1), ratio=0.094).count(8, 4)   # 3 of 32
        3
    """
    block: Tuple[int, int] = (3, 2)
    k: int = DEFAULT_TOP_K
    ratio: Optional[float] = None

    def count(self, height: int, width: int) -> int:
        """Blocks replaced per sample on a ``height x width`` map.

        Raises:
            ValueError: the blocks do not tile the map, ``k`` exceeds the
                blocks, or the ratio rounds to none or all of them.
        """
        rows, cols = check_block_grid(height, width, self.block,
                                      None if self.ratio else self.k)
        return blocks_for_ratio(rows * cols, self.ratio) if self.ratio \
            else self.k


def block_mask(cam: torch.Tensor, block: Sequence[int], k: int) -> torch.Tensor:
    """Mask that is 0 on the ``k`` hottest blocks of each CAM and 1 elsewhere.

    The map is cut into non-overlapping ``block[0] x block[1]`` blocks; each
    block's score is the sum of the CAM over it.  Ties are broken in favour of
    the block that comes first in row-major order, so the result is
    deterministic.

    Args:
        cam (Tensor): N x H x W.
        block (sequence of int): block height and width; must divide H and W.
        k (int): number of blocks to mark per sample, 0 <= k <= blocks.

    Returns:
        Tensor: N x 1 x H x W of 0/1 in ``cam``'s dtype.

    Examples::

        >>> cam = torch.zeros(1, 4, 4); cam[0, 2:, :2] = 1
        >>> block_mask(cam, (2, 2), 1)[0, 0]
        tensor([[1., 1., 1., 1.],
                [1., 1., 1., 1.],
                [0., 0., 1., 1.],
                [0., 0., 1., 1.]])
    """
    if cam.dim() != 3:
        raise ValueError(
            'block_mask: cam must be N x H x W, got shape {}'.format(
                tuple(cam.shape)
            )
        )
    n, height, width = cam.shape
    rows, cols = check_block_grid(height, width, block, k)
    bh, bw = int(block[0]), int(block[1])
    scores = cam.reshape(n, rows, bh, cols, bw).sum(dim=(2, 4)).reshape(n, -1)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    keep = torch.ones_like(scores)
    keep.scatter_(1, order[:, :k], 0.0)
    keep = keep.view(n, 1, rows, 1, cols, 1).expand(n, 1, rows, bh, cols, bw)
    return keep.reshape(n, 1, height, width).contiguous()


def sample_negatives(
    labels: torch.Tensor, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """For every sample, a uniformly random batch index of another identity.

    Works for any batch layout (not only P identities x K instances).  The draw
    happens on the generator's device (CPU by default) so that a seeded CPU
    generator makes runs reproducible on every device.

    Args:
        labels (Tensor): N identity labels.
        generator (torch.Generator, optional): source of randomness.

    Returns:
        Tensor: N long indices on ``labels.device`` with
        ``labels[result[i]] != labels[i]``.

    Raises:
        ValueError: if some sample has no partner of another identity (e.g.
            a batch with a single identity).
    """
    if labels.dim() != 1:
        raise ValueError(
            'sample_negatives: labels must be 1-D, got shape {}'.format(
                tuple(labels.shape)
            )
        )
    device = generator.device if generator is not None else labels.device
    lab = labels.to(device)
    other = lab.view(-1, 1) != lab.view(1, -1)
    lonely = ~other.any(dim=1)
    if bool(lonely.any()):
        raise ValueError(
            'sample_negatives: a batch of {} samples with {} identit{} leaves '
            'no sample of another identity to mix with; PMM needs at least 2 '
            'identities per batch (use sampler.train_sampler '
            'RandomIdentitySampler with train.batch_size >= 2 x '
            'sampler.num_instances)'.format(
                lab.numel(), int(torch.unique(lab).numel()),
                'y' if torch.unique(lab).numel() == 1 else 'ies'
            )
        )
    picks = torch.multinomial(
        other.float(), 1, replacement=True, generator=generator
    ).view(-1)
    return picks.to(labels.device)


def hard_mix(
    x: torch.Tensor, mask: torch.Tensor, negatives: torch.Tensor
) -> torch.Tensor:
    """A-Hard-Mix: ``mask * x + (1 - mask) * x[negatives]``, exactly.

    Positions where ``mask`` is 1 keep the sample's own features; positions
    where it is 0 take the features of the partner ``negatives[i]``.  Gradients
    flow into both.  Labels are not mixed.

    Args:
        x (Tensor): N x C x H x W.
        mask (Tensor): N x 1 x H x W of 0/1 (see :func:`block_mask`).
        negatives (Tensor): N batch indices (see :func:`sample_negatives`).

    Returns:
        Tensor: N x C x H x W.
    """
    if mask.dim() != 4 or mask.shape[0] != x.shape[0] or mask.shape[1] != 1 \
            or mask.shape[2:] != x.shape[2:]:
        raise ValueError(
            'hard_mix: mask of shape {} does not fit x of shape {} (expected '
            'N x 1 x H x W)'.format(tuple(mask.shape), tuple(x.shape))
        )
    if negatives.shape != (x.shape[0], ):
        raise ValueError(
            'hard_mix: negatives must hold one index per sample ({}), got '
            'shape {}'.format(x.shape[0], tuple(negatives.shape))
        )
    return torch.where(mask.bool(), x, x.index_select(0, negatives))


class Mixed(NamedTuple):
    """What a mixing rule gives the next stage.

    Attributes:
        features (Tensor): N x C x H x W, the stage's input.
        mask (Tensor): N x 1 x H x W, 1 where the sample keeps its own
            features, 0 where they were replaced (pasted or zeroed).
        negatives (Tensor or None): N batch indices of the samples whose
            features were pasted in; None when nothing was pasted.
        partner_weight (Tensor): N, the share of ``labels[negatives]`` in the
            cross-entropy target (the rest goes to the sample's own label);
            all zeros for the rules that do not mix labels.
    """
    features: torch.Tensor
    mask: torch.Tensor
    negatives: Optional[torch.Tensor]
    partner_weight: torch.Tensor


def random_block_mask(
    n: int, height: int, width: int, block: Sequence[int], k: int,
    generator: Optional[torch.Generator] = None, same_for_batch: bool = False,
    device=None, dtype=torch.float32
) -> torch.Tensor:
    """Mask that is 0 on ``k`` blocks drawn uniformly at random, 1 elsewhere.

    Args:
        n (int): batch size.
        height, width (int): feature-map size.
        block (sequence of int): block height and width; must tile the map.
        k (int): blocks per sample, drawn without replacement.
        generator (torch.Generator, optional): source of randomness (the draw
            happens on its device, CPU by default).
        same_for_batch (bool): one draw shared by the whole batch (Batch
            DropBlock) instead of one per sample. Default is False.

    Returns:
        Tensor: N x 1 x H x W of 0/1.
    """
    rows, cols = check_block_grid(height, width, block, k)
    draws = 1 if same_for_batch else n
    gen_device = generator.device if generator is not None else 'cpu'
    scores = torch.rand(draws, rows * cols, generator=generator,
                        device=gen_device)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    keep = torch.ones(draws, rows * cols, device=gen_device)
    keep.scatter_(1, order[:, :k], 0.0)
    bh, bw = int(block[0]), int(block[1])
    keep = keep.view(draws, 1, rows, 1, cols, 1).expand(
        draws, 1, rows, bh, cols, bw).reshape(draws, 1, height, width)
    keep = keep.expand(n, 1, height, width).contiguous()
    return keep.to(device=device, dtype=dtype)


def replaced_fraction(mask: torch.Tensor) -> torch.Tensor:
    """Per sample, the fraction of the map where ``mask`` is 0 (N x 1 x H x W
    -> N): the share of the partner's label when labels are mixed by area."""
    return 1.0 - mask.flatten(1).mean(dim=1)


class MixRule(object):
    """Base of the rules that build a later stage's input from the part map.

    A rule is called by :class:`pmm_torchreid.models.PMM` between two stages
    as ``rule(part_map, cam_map, cam_logits, labels)`` and returns
    :class:`Mixed`.  ``cam_map``/``cam_logits`` are the previous stage's input
    and logits, for the rules guided by its Grad-CAM.  Every rule
    works on ``k`` blocks of ``block`` size, so the variants change which
    blocks (salient or random, per sample or per batch) and what fills them,
    never how much of the map.

    Args:
        block (sequence of int): block height and width on the feature map.
            Default is (3, 2), the paper's blocks on a 24 x 8 map.
        k (int): blocks per sample. Default is :data:`DEFAULT_TOP_K` (3).
        generator (torch.Generator, optional): draws partners and blocks.
        ratio (float, optional): the share of the map's blocks to replace
            instead of ``k`` (:func:`blocks_for_ratio` of the grid the map
            gives), so one value fits every input size. Default is None.
    """

    name = ''

    def __init__(
        self,
        block: Sequence[int] = (3, 2),
        k: int = DEFAULT_TOP_K,
        generator: Optional[torch.Generator] = None,
        ratio: Optional[float] = None
    ):
        self.choice = BlockChoice((int(block[0]), int(block[1])), int(k),
                                  None if ratio is None else float(ratio))
        self.generator = generator

    @property
    def block(self) -> Tuple[int, int]:
        return self.choice.block

    @property
    def k(self) -> int:
        return self.choice.k

    @property
    def ratio(self) -> Optional[float]:
        return self.choice.ratio

    def blocks(self, height: int, width: int) -> int:
        """The number of blocks replaced on a ``height x width`` map."""
        return self.choice.count(height, width)

    #: partner indices to use instead of drawing, one tensor per call, in
    #: stage order (:func:`with_partners`); None: draw
    given: Optional[List[torch.Tensor]] = None

    def partners(self, labels: torch.Tensor) -> torch.Tensor:
        """For every sample, the batch index of its partner of another
        identity: drawn (:func:`sample_negatives`), or the next given ones."""
        if self.given:
            return self.given.pop(0).to(labels.device)
        return sample_negatives(labels, self.generator)

    def cam_mask(self, part_map, cam_map, cam_logits, labels):
        """Top-``k`` mask of the Grad-CAM of ``cam_logits`` at ``cam_map``."""
        cam = grad_cam(cam_logits, cam_map, labels)
        k = self.blocks(*part_map.shape[2:])
        return block_mask(cam, self.block, k).to(part_map.dtype)

    def random_mask(self, part_map, same_for_batch=False):
        n, _, height, width = part_map.shape
        return random_block_mask(
            n, height, width, self.block, self.blocks(height, width),
            self.generator, same_for_batch=same_for_batch,
            device=part_map.device, dtype=part_map.dtype)

    def __call__(
        self, part_map: torch.Tensor, cam_map: torch.Tensor,
        cam_logits: torch.Tensor, labels: torch.Tensor
    ) -> Mixed:
        raise NotImplementedError

    def __repr__(self):
        return '{}(block={}, {})'.format(
            type(self).__name__, self.block, 'k={}'.format(self.k)
            if self.ratio is None else 'ratio={}'.format(self.ratio))


class HardMix(MixRule):
    """A-Hard-Mix (the paper): the ``k`` most salient blocks of each sample,
    by the previous stage's Grad-CAM, take the features of a random sample of
    another identity; the label stays the sample's own.

    Examples::

        >>> mixer = HardMix(block=(3, 2), k=8,
        ...                 generator=torch.Generator().manual_seed(1))
        >>> outputs = model(images, pids, mixer=mixer)
    """

    name = 'hard_mix'

    def __call__(self, part_map, cam_map, cam_logits, labels):
        mask = self.cam_mask(part_map, cam_map, cam_logits, labels)
        negatives = self.partners(labels)
        return Mixed(hard_mix(part_map, mask, negatives), mask, negatives,
                     part_map.new_zeros(part_map.shape[0]))


class RandomMix(MixRule):
    """A-Hard-Mix without the guidance, the control that isolates it: ``k``
    blocks drawn at random for each sample take the features of a random
    sample of another identity, and the label stays the sample's own (the
    paste of :class:`CutMix`, the target of :class:`HardMix`).

    Examples::

        >>> rule = RandomMix(block=(1, 1), k=2,
        ...                  generator=torch.Generator().manual_seed(0))
        >>> part = torch.arange(4.).view(2, 1, 2, 1).expand(2, 3, 2, 1)
        >>> out = rule(part, None, None, torch.tensor([0, 1]))
        >>> out.negatives.tolist(), out.partner_weight.tolist()
        ([1, 0], [0.0, 0.0])
    """

    name = 'random_mix'

    def __call__(self, part_map, cam_map, cam_logits, labels):
        mask = self.random_mask(part_map)
        negatives = self.partners(labels)
        return Mixed(hard_mix(part_map, mask, negatives), mask, negatives,
                     part_map.new_zeros(part_map.shape[0]))


class CutoutMix(MixRule):
    """The ``k`` most salient blocks (as in A-Hard-Mix) are set to zero."""

    name = 'cutout'

    def __call__(self, part_map, cam_map, cam_logits, labels):
        mask = self.cam_mask(part_map, cam_map, cam_logits, labels)
        return Mixed(part_map * mask, mask, None,
                     part_map.new_zeros(part_map.shape[0]))


class CutMix(MixRule):
    """``k`` random blocks of each sample take the features of a random
    sample of another identity; the target gives that sample's label the
    pasted share of the area (CutMix, Yun et al., ICCV 2019, on features)."""

    name = 'cutmix'

    def __call__(self, part_map, cam_map, cam_logits, labels):
        mask = self.random_mask(part_map)
        negatives = self.partners(labels)
        return Mixed(hard_mix(part_map, mask, negatives), mask, negatives,
                     replaced_fraction(mask))


class ACutMix(MixRule):
    """Attentive CutMix: the ``k`` most salient blocks of a random sample of
    another identity (by its own Grad-CAM) are pasted in at the same place;
    labels are mixed by area."""

    name = 'a_cutmix'

    def __call__(self, part_map, cam_map, cam_logits, labels):
        partner_mask = self.cam_mask(part_map, cam_map, cam_logits, labels)
        negatives = self.partners(labels)
        mask = partner_mask.index_select(0, negatives)
        return Mixed(hard_mix(part_map, mask, negatives), mask, negatives,
                     replaced_fraction(mask))


class BatchDrop(MixRule):
    """The same ``k`` random blocks are set to zero for the whole batch
    (Batch DropBlock, Dai et al., ICCV 2019, on the block grid)."""

    name = 'batch_drop'

    def __call__(self, part_map, cam_map, cam_logits, labels):
        mask = self.random_mask(part_map, same_for_batch=True)
        return Mixed(part_map * mask, mask, None,
                     part_map.new_zeros(part_map.shape[0]))


def with_partners(
    rule: MixRule, partners: Sequence[torch.Tensor],
    generator: Optional[torch.Generator] = None
) -> MixRule:
    """A copy of ``rule`` that takes ``partners[0]``, ``partners[1]``, ... (N
    batch indices each, in stage order) instead of drawing partners, and
    draws its random blocks from ``generator``: the same chain, fixed, for
    pictures.  ``rule`` itself and its generator are untouched.

    Examples::

        >>> fixed = with_partners(HardMix((1, 1), 2), [torch.tensor([1, 0])])
        >>> fixed.partners(torch.tensor([0, 1]))
        tensor([1, 0])
    """
    fixed = copy.copy(rule)
    fixed.given = [torch.as_tensor(p).long() for p in partners]
    fixed.generator = generator
    return fixed


MIX_RULES = {rule.name: rule for rule in
             (HardMix, RandomMix, CutoutMix, CutMix, ACutMix, BatchDrop)}

#: Values accepted by ``pmm.mix``.
MIX_MODES = tuple(MIX_RULES) + ('none', )


def __getattr__(name: str):
    # 0.2.0 called the mixing rule ``Cutout``, like the image transform
    # (pmm_torchreid.data.Cutout); the old name still works, with a warning
    if name == 'Cutout':
        warnings.warn('pmm_torchreid.models.guidance.Cutout is now CutoutMix '
                      '(pmm_torchreid 0.3)', DeprecationWarning, stacklevel=2)
        return CutoutMix
    raise AttributeError('module {!r} has no attribute {!r}'.format(
        __name__, name))


def build_mixer(
    mode: str,
    block: Sequence[int] = (3, 2),
    k: int = DEFAULT_TOP_K,
    generator: Optional[torch.Generator] = None,
    ratio: Optional[float] = None
) -> Optional[MixRule]:
    """Returns the mixing rule for ``pmm.mix`` (``None`` for ``'none'``);
    ``ratio``, when given, sets the replaced share instead of ``k``."""
    if mode == 'none':
        return None
    if mode not in MIX_RULES:
        raise ValueError(
            'pmm.mix = {!r} is not a mixing rule; expected one of {}'.format(
                mode, list(MIX_MODES)))
    return MIX_RULES[mode](block=block, k=k, generator=generator,
                           ratio=ratio)
