"""The pieces of a distributed run on their own: the launch from torchrun's
environment, the config checks, the distributed identity sampler and the
SyncBatchNorm conversion; the exchanges between ranks are tested in real
runs (tests/test_ddp_runs.py)."""
import pytest
import torch

from pmm_torchreid.config import get_default_config
from pmm_torchreid.utils import distributed
from pmm_torchreid.utils.distributed import DistributedIdentitySampler, launch_info


# --------------------------------------------------------------------------
# the launch
# --------------------------------------------------------------------------
def test_launch_info_reads_torchrun_variables():
    env = {'WORLD_SIZE': '4', 'RANK': '2', 'LOCAL_RANK': '0'}
    assert launch_info(env) == (4, 2, 0)
    assert launch_info({}) is None  # a plain run
    # one process under torchrun is a plain run too
    assert launch_info({'WORLD_SIZE': '1', 'RANK': '0',
                        'LOCAL_RANK': '0'}) is None


@pytest.mark.parametrize('env, match', [
    ({'WORLD_SIZE': '2'}, r"\['RANK', 'LOCAL_RANK'\] missing"),
    ({'WORLD_SIZE': '2', 'RANK': 'x', 'LOCAL_RANK': '0'}, 'whole numbers'),
    ({'WORLD_SIZE': '2', 'RANK': '2', 'LOCAL_RANK': '0'}, '0 <= RANK'),
])
def test_launch_info_names_a_broken_environment(env, match):
    with pytest.raises(ValueError, match=match):
        launch_info(env)


def _cfg(**train):
    cfg = get_default_config()
    cfg.use_gpu = False
    cfg.train.batch_size = train.pop('batch_size', 16)
    cfg.sampler.num_instances = train.pop('num_instances', 4)
    for key, value in train.items():
        cfg.train[key] = value
    return cfg


def test_new_keys_have_safe_defaults():
    cfg = get_default_config()
    assert cfg.train.sync_bn is False
    assert cfg.train.dist_timeout == 1800
    assert cfg.test.dist_eval_timeout == 7200


def test_config_check_of_a_distributed_run():
    distributed.check_world_config(_cfg(), 2)  # 2 ranks x 2 identities x 4
    with pytest.raises(ValueError, match=r'train.batch_size = 16: expected a '
                       r'multiple of the 3 processes'):
        distributed.check_world_config(_cfg(), 3)
    with pytest.raises(ValueError, match=r'\(16, 4\).*each of the 4 processes '
                       r'\(4 images\).*at least 2 of them'):
        distributed.check_world_config(_cfg(), 4)
    cfg = _cfg()
    cfg.sampler.train_sampler = 'RandomDomainSampler'
    with pytest.raises(ValueError, match='sampler.train_sampler'):
        distributed.check_world_config(cfg, 2)
    with pytest.raises(ValueError, match='train.sync_bn = True: expected '
                       'False on the CPU'):
        distributed.check_world_config(_cfg(sync_bn=True), 2)


def test_sync_bn_replaces_every_batchnorm_and_keeps_the_keys():
    from pmm_torchreid.models import PMM
    torch.manual_seed(0)
    net = PMM(5, backbone='resnet18', pretrained=False)
    before = net.state_dict()
    synced = distributed.with_sync_bn(net)
    kinds = {type(m) for m in synced.modules()}
    assert torch.nn.SyncBatchNorm in kinds
    assert not kinds & {torch.nn.BatchNorm1d, torch.nn.BatchNorm2d}
    after = synced.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_timeouts_are_checked():
    from pmm_torchreid.config.checks import check_config
    cfg = get_default_config()
    cfg.test.dist_eval_timeout = 0
    with pytest.raises(ValueError, match='test.dist_eval_timeout = 0'):
        check_config(cfg)


# --------------------------------------------------------------------------
# the sampler
# --------------------------------------------------------------------------
def _data(ids=13, images=7, short=(3, 2)):
    """``ids`` identities of ``images`` images, plus identity 99 with 3 and
    identity 98 with 2 (fewer than num_instances)."""
    items = [('img{}_{}'.format(p, i), p, i % 2) for p in range(ids)
             for i in range(images)]
    items += [('short{}'.format(i), 99, 0) for i in range(short[0])]
    items += [('short2_{}'.format(i), 98, 0) for i in range(short[1])]
    return items


def _epoch(data, world, epoch=0, batch=16, k=4, seed=1):
    samplers = [DistributedIdentitySampler(data, batch, k, world, r, seed)
                for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    return samplers, [list(s) for s in samplers]


@pytest.mark.parametrize('world', [1, 2, 4])
def test_ranks_get_disjoint_whole_identities_in_every_step(world):
    data = _data()
    samplers, batches = _epoch(data, world, batch=8 * world, k=4)
    lengths = {len(b) for b in batches} | {len(s) for s in samplers}
    assert len(lengths) == 1 and lengths.pop() > 0  # the same step count
    for step in zip(*batches):
        seen = set()
        for rank_batch in step:
            assert len(rank_batch) == 8
            pids = [data[i][1] for i in rank_batch]
            # 2 identities of 4 images each, in order
            assert pids[:4] == [pids[0]] * 4 and pids[4:] == [pids[4]] * 4
            assert pids[0] != pids[4]
            assert not seen & set(pids)  # no identity on two ranks
            seen |= set(pids)


def test_an_epoch_uses_every_chunk_once_and_leaves_too_few_to_step():
    data = _data()
    world, k = 2, 4
    samplers, batches = _epoch(data, world, batch=16, k=k)
    used = [i for b in batches for step in b for i in step]
    # identity 99 (3 images) and 98 (2) are filled up with repeats; every
    # other image is used at most once
    plain = [i for i in used if data[i][1] < 98]
    assert len(plain) == len(set(plain))
    chunks_per_id = {p: 7 // k for p in range(13)}
    chunks_per_id.update({99: 1, 98: 1})
    taken = {}
    for i in used[::k]:
        taken[data[i][1]] = taken.get(data[i][1], 0) + 1
    left = [p for p, n in chunks_per_id.items() if taken.get(p, 0) < n]
    # the epoch ends when fewer identities than one step needs are left
    assert len(left) < samplers[0].ids_per_step
    assert all(taken.get(p, 0) == n for p, n in chunks_per_id.items()
               if p not in left)


def test_the_draw_is_seeded_and_changes_with_the_epoch():
    data = _data()
    _, first = _epoch(data, 2, epoch=0)
    _, again = _epoch(data, 2, epoch=0)
    _, later = _epoch(data, 2, epoch=1)
    _, other_seed = _epoch(data, 2, epoch=0, seed=2)
    assert first == again
    assert first != later and first != other_seed
    # it does not touch (or depend on) the global generators
    torch.manual_seed(123)
    state = torch.get_rng_state()
    assert _epoch(data, 2, epoch=0)[1] == first
    assert torch.equal(torch.get_rng_state(), state)


def test_sampler_refuses_a_batch_that_does_not_split():
    with pytest.raises(ValueError, match='6.0 images per rank'):
        DistributedIdentitySampler(_data(), 12, 4, 2, 0)
    with pytest.raises(ValueError, match='15 identities cannot fill one step '
                       'of 2 ranks x 8 identities'):
        DistributedIdentitySampler(_data(), 64, 4, 2, 0)
