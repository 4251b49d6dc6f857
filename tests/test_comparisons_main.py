"""FMN and MagnifierNet end to end, as a user runs them: scripts/main.py on
the synthetic data (helpers.SMALL, one epoch; its main in this process), the
run's records, torchreid's FeatureExtractor, an exact resume, and the mask
pictures of scripts/visualize_gradcam.py."""
import csv
import json
import os

import pytest
import torch
import torchreid
from helpers import CONFIG, SMALL, SMALL_QUERIES, in_process

pytestmark = pytest.mark.slow

TINY = SMALL + ['pmm.mix', 'none', 'train.max_epoch', '1']
#: model -> what its step reports besides loss_t/loss_x/acc of its branches
MODELS = {'fmn_resnet18': (2, []),
          'magnifiernet_osnet_x0_25': (3, ['loss_sd', 'loss_parsing'])}


def run(script, root, *args):
    """scripts/main.py or scripts/visualize_gradcam.py, their main in this
    process: what they printed (stdout, then stderr); asserts success."""
    from pmm_torchreid.cli import pictures, train
    main = {'main.py': train.main, 'visualize_gradcam.py': pictures.main}[script]
    proc = in_process(main, ['--config-file', CONFIG, '--root', root] + list(args))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope='module')
def runs(synthetic_root, tmp_path_factory):
    """model -> (model, save_dir, output) of its one-epoch run, trained when
    a test first asks for it."""
    done = {}

    def get(model):
        if model not in done:
            save_dir = str(tmp_path_factory.mktemp('log-' + model))
            out = run('main.py', synthetic_root, '-m', model, 'data.save_dir',
                      save_dir, *TINY)
            done[model] = model, save_dir, out
        return done[model]
    return get


@pytest.fixture(params=sorted(MODELS))
def trained(request, runs):
    return runs(request.param)


@pytest.fixture
def magnifiernet(runs):
    """The model with its own random draws and the part masks."""
    return runs('magnifiernet_osnet_x0_25')


def test_one_epoch_trains_evaluates_and_records(trained):
    model, save_dir, out = trained
    branches, extra = MODELS[model]
    assert 'Building model: {}'.format(model) in out
    assert 'mAP:' in out and 'Rank-1' in out
    assert 'Done, obtained {}-by-{} matrix'.format(
        SMALL_QUERIES, 512 * branches) in out
    with open(os.path.join(save_dir, 'results.json')) as f:
        res = json.load(f)
    assert res['model'] == model and res['mix'] == 'none'
    assert 0 <= res['results']['pmm_synthetic']['mAP'] <= 100
    with open(os.path.join(save_dir, 'curves.csv')) as f:
        rows = list(csv.DictReader(f))
    train = [r for r in rows if r['kind'] == 'train']
    assert len(train) == 1
    keys = ['loss_t{}'.format(s) for s in range(1, branches + 1)] + \
        ['acc{}'.format(s) for s in range(1, branches + 1)] + extra + ['loss']
    for key in keys:
        assert float(train[0][key]) >= 0, key
    assert 'loss_t{}'.format(branches + 1) not in rows[0]
    if model.startswith('magnifiernet'):
        # the synthetic dataset's exact masks, not the band fallback
        assert 'Drawing the part masks' in out or 'BANDS' not in out
        assert 'FIXED HORIZONTAL BANDS' not in out


def test_feature_extractor_gives_the_descriptor(trained, synthetic_root):
    model, save_dir, _ = trained
    import pmm_torchreid  # noqa: F401  (registers the models)
    path = os.path.join(save_dir, 'model', 'model.pth.tar-1')
    extractor = torchreid.utils.FeatureExtractor(
        model_name=model, model_path=path, image_size=(32, 16), device='cpu',
        verbose=False)
    # the extractor's network holds exactly the trained weights
    state = torch.load(path, weights_only=True)['state_dict']
    own = extractor.model.state_dict()
    loaded = [k for k in state if 'classifier' not in k]
    assert len(loaded) > 10
    for key in loaded:
        assert torch.equal(own[key], state[key]), key
    folder = os.path.join(synthetic_root, 'pmm_synthetic', 'query')
    a, b = [os.path.join(folder, n) for n in sorted(os.listdir(folder))[:2]]
    feats = extractor([a, a, b])
    assert feats.shape == (3, 512 * MODELS[model][0])
    torch.testing.assert_close(feats[0], feats[1])  # deterministic in eval
    assert not torch.allclose(feats[0], feats[2])  # and tells images apart


def test_resume_repeats_an_uninterrupted_run(magnifiernet, synthetic_root,
                                             tmp_path):
    """Two epochs straight == one epoch, then resumed to two: MagnifierNet's
    occlusion draws come from torch's generator, whose state the checkpoint
    holds (both runs evaluate after epoch 1, as the one-epoch run did: making
    the evaluation loaders draws from that generator too)."""
    model, save_dir, _ = magnifiernet
    straight = str(tmp_path / 'straight')
    run('main.py', synthetic_root, '-m', model, 'data.save_dir', straight,
        *(TINY + ['train.max_epoch', '2']))
    resumed = str(tmp_path / 'resumed')
    out = run('main.py', synthetic_root, '-m', model, 'data.save_dir',
              resumed, *(TINY + ['train.max_epoch', '2', 'model.resume',
                                 os.path.join(save_dir, 'model',
                                              'model.pth.tar-1')]))
    assert 'epoch: [2/2]' in out and 'epoch: [1/2]' not in out
    a = torch.load(os.path.join(straight, 'model', 'model.pth.tar-2'),
                   weights_only=True)['state_dict']
    b = torch.load(os.path.join(resumed, 'model', 'model.pth.tar-2'),
                   weights_only=True)['state_dict']
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_visualize_draws_the_masks(trained, synthetic_root, tmp_path):
    model, save_dir, _ = trained
    out_dir = str(tmp_path / 'pictures')
    out = run('visualize_gradcam.py', synthetic_root, '--num', '3',
              '--sheet', '3', '--output', out_dir, '-m', model,
              'model.load_weights', os.path.join(save_dir, 'model',
                                                 'model.pth.tar-1'), *TINY)
    assert 'Wrote 3 panels' in out
    names = sorted(os.listdir(out_dir))
    assert 'sheet.png' in names and 'masks.json' in names
    assert len([n for n in names if n.startswith('q')]) == 3
    with open(os.path.join(out_dir, 'masks.json')) as f:
        report = json.load(f)
    assert report['model'] == model and len(report['pictured']) == 3
    per_image = report['per_image']
    assert len(per_image) == 3
    # the mean is the mean of the pictured images' own numbers
    for key, mean in report['mean'].items():
        assert mean == pytest.approx(sum(s[key] for s in per_image) / 3), key
    if model.startswith('fmn'):
        for stats in per_image:
            assert 0 <= stats['mask_min'] <= stats['mask_mean'] \
                <= stats['mask_max'] <= 1
            assert stats['mask_min'] < stats['mask_max']  # not a flat mask
    else:
        regions = ('head', 'upper_body', 'lower_body', 'shoes')
        cells = 8  # OSNet's 4x2 map of a 32x16 image
        for stats in per_image:
            shares = [stats['share_' + r] for r in regions]
            # each share counts whole feature cells, the rest is background
            for value in shares + [stats['cell_agreement']]:
                assert 0 <= value <= 1
                assert value * cells == pytest.approx(round(value * cells))
            assert 0 <= sum(shares) <= 1
    from PIL import Image
    panel = Image.open(os.path.join(out_dir, [n for n in names
                                              if n.startswith('q')][0]))
    tiles = 3 if model.startswith('fmn') else 7
    assert panel.size[0] > tiles * 128  # input, mask(s) ... at >= 128 px each


def test_evaluation_only_with_visrank_needs_no_masks(magnifiernet,
                                                    synthetic_root, tmp_path):
    model, save_dir, _ = magnifiernet
    out = run('main.py', synthetic_root, '-m', model, 'data.save_dir',
              str(tmp_path), 'test.evaluate', 'True', 'test.visrank', 'True',
              'magnifiernet.masks_root', str(tmp_path / 'no-such-folder'),
              'model.load_weights', os.path.join(save_dir, 'model',
                                                 'model.pth.tar-1'), *TINY)
    assert 'mAP:' in out and 'BANDS' not in out and 'no mask' not in out
    ranked = os.listdir(str(tmp_path / 'visrank_pmm_synthetic'))
    assert len(ranked) == SMALL_QUERIES


def test_visualize_refuses_bdb_with_a_message(synthetic_root, tmp_path):
    from pmm_torchreid.cli.pictures import main
    proc = in_process(main, ['--config-file', CONFIG, '--root', synthetic_root,
                             '-m', 'bdb_resnet18', 'data.save_dir', str(tmp_path)]
                      + TINY)
    assert proc.returncode != 0
    assert 'need a PMM model' in proc.stderr and 'MagnifierNet' in proc.stderr
