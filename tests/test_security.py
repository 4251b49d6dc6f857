"""No code runs from a checkpoint or weights file, and downloaded weights are
verified: crafted malicious pickles, and a tampered OSNet weights file."""
import os
import os.path as osp
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, SHARED, in_process, main_args

import pmm_torchreid.models.backbones as backbones
from pmm_torchreid.models.backbones import build_backbone
from pmm_torchreid.utils.checkpoint import load_checkpoint, load_pretrained_weights


class Payload(object):
    """Unpickling this creates the file ``flag`` (runs ``open(flag, 'w')``)."""

    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return (open, (self.flag, 'w'))


def malicious_files(folder):
    """The same payload in torch's zip format, its legacy format and as a
    bare pickle; returns (flag path, [files])."""
    flag = osp.join(str(folder), 'pwned')
    state = {'state_dict': {'w': torch.zeros(1)}, 'epoch': 1,
             'evil': Payload(flag)}
    files = [osp.join(str(folder), name) for name in
             ('zip.pth', 'legacy.pth.tar', 'bare.pkl')]
    torch.save(state, files[0])
    torch.save(state, files[1], _use_new_zipfile_serialization=False)
    with open(files[2], 'wb') as f:
        pickle.dump(state, f)
    return flag, files


@pytest.mark.slow
def test_the_payload_really_runs_when_unpickled_unsafely(tmp_path):
    # so that the tests below can fail: an unsafe load creates the flag
    flag, files = malicious_files(tmp_path)
    for path in files:
        code = ('import pickle, torch\n'
                'p = {!r}\n'
                'torch.load(p, weights_only=False) if p.endswith("tar") or '
                'p.endswith("pth") else pickle.load(open(p, "rb"))').format(path)
        subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=False)
        assert osp.exists(flag), path
        os.unlink(flag)


def test_loading_refuses_every_malicious_file_and_runs_nothing(tmp_path):
    flag, files = malicious_files(tmp_path)
    model = torch.nn.Linear(1, 1)
    for path in files:
        with pytest.raises(RuntimeError) as info:
            load_checkpoint(path)
        assert 'refused to load "{}"'.format(path) in str(info.value)
        with pytest.raises(RuntimeError, match='refused to load'):
            load_pretrained_weights(model, path)
        assert not osp.exists(flag)


@pytest.mark.parametrize('key', ['model.load_weights', 'model.resume'])
def test_main_refuses_a_malicious_checkpoint(key, tmp_path, synthetic_root):
    """scripts/main.py's main, in this process: had it unpickled the file,
    the payload would have run here and left its flag."""
    from pmm_torchreid.cli.train import main
    flag, files = malicious_files(tmp_path)
    proc = in_process(main, main_args(synthetic_root, str(tmp_path / 'log'),
                                      key, files[1]))
    assert proc.returncode != 0
    assert 'refused to load "{}"'.format(files[1]) in proc.stderr
    assert not osp.exists(flag)
    assert not osp.exists(tmp_path / 'log' / 'model')  # no training happened


OSNET = osp.join(SHARED, 'weights', 'osnet_x0_25_imagenet.pth')


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    os.makedirs(tmp_path / 'torch' / 'checkpoints')
    return osp.join(str(tmp_path), 'torch', 'checkpoints',
                    'osnet_x0_25_imagenet.pth')


@pytest.mark.skipif(not osp.isfile(OSNET), reason='needs ../shared/weights')
def test_osnet_weights_load_only_with_the_recorded_hash(torch_home, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError('a cached file must not be downloaded again')

    monkeypatch.setattr('gdown.download', no_download)
    shutil.copyfile(OSNET, torch_home)
    body = build_backbone('osnet_x0_25', pretrained=True).body
    state = torch.load(OSNET, weights_only=True)
    assert torch.equal(body[0].conv.weight, state['conv1.conv.weight'])
    # the same tensors, saved again: a valid file, but not the published one
    state['conv1.conv.weight'].add_(1)
    torch.save(state, torch_home)
    with pytest.raises(RuntimeError) as info:
        build_backbone('osnet_x0_25', pretrained=True)
    assert torch_home in str(info.value)
    assert backbones.OSNET_X0_25_SHA256 in str(info.value)
    assert osp.exists(torch_home)  # the user's file is not deleted


def test_osnet_download_with_a_wrong_hash_is_discarded(torch_home, monkeypatch):
    calls = []

    def fake_download(url, output, quiet=False):
        calls.append(url)
        with open(output, 'wb') as f:
            f.write(b'something else')
        return output

    monkeypatch.setattr('gdown.download', fake_download)
    with pytest.raises(RuntimeError, match='SHA-256'):
        build_backbone('osnet_x0_25', pretrained=True)
    assert calls == [backbones.OSNET_X0_25_URL]
    assert os.listdir(osp.dirname(torch_home)) == []  # nothing kept


def test_no_download_without_pretrained(torch_home, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError('pretrained=False must not download')

    monkeypatch.setattr('gdown.download', no_download)
    monkeypatch.setattr('torch.hub.load_state_dict_from_url', no_download)
    for name in ('resnet18', 'osnet_x0_25'):
        build_backbone(name, pretrained=False)
