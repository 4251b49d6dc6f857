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


# --------------------------------------------------------------------------
# waiting for rank 0's evaluation, and telling a lost rank from a bug
# --------------------------------------------------------------------------
def _gloo_pair(seconds):
    """Ranks 0 and 1 of a real two-rank gloo group, both in this process
    (one thread each while they connect): a collective that rank 1 never
    joins makes rank 0's side time out after ``seconds``, as a lost rank
    does."""
    import datetime
    import threading

    import torch.distributed as dist
    store = dist.HashStore()
    pair = {}

    def join(r):
        pair[r] = dist.ProcessGroupGloo(
            dist.PrefixStore('pair', store), r, 2,
            datetime.timedelta(seconds=seconds))

    threads = [threading.Thread(target=join, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return pair[0], pair[1]


@pytest.fixture
def rank0_of_two(monkeypatch):
    """``distributed.init`` as rank 0 of 2 (the process group itself is
    faked; the wait group is rank 0 of a real gloo pair made with the
    timeout init asks for): ``(made, peers)``, the new_group calls' keyword
    arguments and the rank-1 side of each pair."""
    import torch.distributed as dist
    made, peers = [], []

    def new_group(**kwargs):
        made.append(kwargs)
        mine, peer = _gloo_pair(kwargs['timeout'].total_seconds())
        peers.append(peer)
        return mine

    monkeypatch.setattr(distributed, '_STATE', {})
    monkeypatch.setattr(dist, 'is_initialized', lambda: True)
    monkeypatch.setattr(dist, 'new_group', new_group)
    # a barrier on the unregistered pair: the group's own barrier
    monkeypatch.setattr(dist, 'barrier',
                        lambda group=None: group.barrier().wait())
    cfg = _cfg(dist_timeout=20)
    cfg.test.dist_eval_timeout = 1
    distributed.init(cfg, distributed.LaunchInfo(2, 0, 0))
    return made, peers


def test_the_wait_for_rank_0_times_out_after_the_eval_timeout(rank0_of_two):
    import time
    made, _ = rank0_of_two
    assert [m['timeout'].total_seconds() for m in made] == [1.0]
    assert distributed.is_active() and distributed.rank() == 0
    start = time.time()
    # rank 1 never comes: rank 0 waits test.dist_eval_timeout (1 s), not
    # train.dist_timeout (20 s), and stops with an error that names it
    with pytest.raises(distributed.LostRankError) as info:
        distributed.wait_for_main('the evaluation on rank 0')
    waited = time.time() - start
    assert 0.9 <= waited < 10, waited
    text = str(info.value)
    assert text.startswith('rank 0 of 2 stopped while the ranks waited for '
                           'the evaluation on rank 0: another rank died')
    assert 'test.dist_eval_timeout = 1 s' in text
    assert 'RuntimeError: ' in text  # gloo's own first line follows
    assert isinstance(info.value.__cause__, RuntimeError)
    assert distributed.is_comm_error(info.value.__cause__)


def test_the_wait_for_rank_0_ends_when_every_rank_comes(rank0_of_two):
    import threading
    _, peers = rank0_of_two
    other = threading.Thread(target=lambda: peers[0].barrier().wait())
    other.start()
    distributed.wait_for_main('the evaluation on rank 0')  # no error
    other.join(timeout=10)
    assert not other.is_alive()


def test_a_failure_that_is_not_a_lost_rank_passes_through(monkeypatch):
    import torch.distributed as dist
    monkeypatch.setattr(distributed, '_STATE', {
        'info': distributed.LaunchInfo(2, 1, 1), 'wait_group': object(),
        'eval_timeout': 5.0})

    def barrier(group=None):
        raise ValueError('a bug of this rank')

    monkeypatch.setattr(dist, 'barrier', barrier)
    with pytest.raises(ValueError, match='a bug of this rank'):
        distributed.wait_for_main('the training pictures')
    # and in a plain run there is nobody to wait for
    monkeypatch.setattr(distributed, '_STATE', {})
    distributed.wait_for_main('the evaluation on rank 0')


# what gloo and NCCL say when a peer is gone or late (real texts)
GLOO_TIMEOUT = ('[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer'
                '.cc:78] Timed out waiting 1000ms for recv operation to '
                'complete')


@pytest.mark.parametrize('error', [
    RuntimeError(GLOO_TIMEOUT),
    RuntimeError('[../third_party/gloo/gloo/transport/tcp/pair.cc:534] '
                 'Connection closed by peer [127.0.0.1]:29500'),
    RuntimeError('Connection reset by peer'),
    RuntimeError('CONNECTION REFUSED'),  # the words in any case
    RuntimeError('[Rank 0] Watchdog caught collective operation timeout'),
    RuntimeError('NCCL communicator was aborted on rank 1'),
    RuntimeError('ProcessGroupGloo::allreduce failed'),
    RuntimeError('Broken pipe'),
    RuntimeError('recv: Socket closed'),
    distributed.LostRankError('rank 1 of 2 stopped'),
    torch.distributed.DistError('any text at all'),
    torch.distributed.DistNetworkError('any text at all'),
], ids=lambda e: type(e).__name__ + ':' + str(e)[:30])
def test_communication_errors_are_recognised(error):
    assert distributed.is_comm_error(error)


@pytest.mark.parametrize('error', [
    # this rank's own work, though the text is close
    RuntimeError('mat1 and mat2 shapes cannot be multiplied (8x2048 and '
                 '1024x751)'),
    RuntimeError('CUDA out of memory. Tried to allocate 2.00 GiB'),
    RuntimeError('DataLoader worker (pid 4242) exited unexpectedly'),
    RuntimeError('lost connection to the dataset server'),  # no known phrase
    RuntimeError('the connection was reset'),  # not "connection reset"
    RuntimeError('timed-out'),
    RuntimeError(''),
    # the words, but not a RuntimeError: a config or data error
    ValueError('data.root = "/mnt/socket": expected a folder'),
    KeyError('gloo'),
    FloatingPointError('loss timed out'),
    TimeoutError('timed out'),
], ids=lambda e: type(e).__name__ + ':' + str(e)[:30])
def test_other_errors_are_not_taken_for_a_lost_rank(error):
    assert not distributed.is_comm_error(error)
