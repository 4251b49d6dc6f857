"""The ``>>>`` examples of the package's docstrings run and print what they
show (the standard doctest module, one test per module).

Many examples are fragments of a larger program (``model``, ``images``,
``dataset.train``, ...); :data:`CONTEXT` gives each module the few small
objects its examples take for granted, built without data, downloads or
training.  Everything runs in a temporary folder (the examples write
``log/...``)."""
import doctest
import importlib
import json
import pkgutil
import types

import pytest
import torch

import pmm_torchreid


def _modules_with_examples():
    names = sorted(m.name for m in pkgutil.walk_packages(
        pmm_torchreid.__path__, 'pmm_torchreid.'))
    found = {}
    for name in names:
        tests = [t for t in doctest.DocTestFinder().find(
            importlib.import_module(name)) if t.examples]
        if tests:
            found[name] = tests
    return found


EXAMPLES = _modules_with_examples()


def _pmm18(train=False):
    from pmm_torchreid.models import PMM
    torch.manual_seed(0)
    model = PMM(num_classes=751, backbone='resnet18', pretrained=False)
    return model.train(train)


def _export_context():
    from helpers import CONFIG

    from pmm_torchreid import launch
    from pmm_torchreid.config import get_default_config
    cfg = get_default_config()
    cfg.merge_from_file(CONFIG)  # pmm_resnet18, no ImageNet weights
    # the checkpoint load_export_weights reads, in the current folder
    path = 'log/pmm_demo/model/model.pth.tar-24'
    import os
    os.makedirs(os.path.dirname(path))
    torch.save({'state_dict': launch.build_model(cfg, 100).state_dict()},
               path)
    # load_export_weights's example builds ``model``, export_onnx's makes
    # ``proto`` from it: check_export's example, further down, uses both
    return dict(launch=launch, cfg=cfg, images=torch.randn(2, 3, 384, 128))


def _rank_context():
    import torchreid
    torch.manual_seed(0)
    # 6 queries (camera 0); each identity once in the gallery (camera 1),
    # near its query, among 54 distractors: 60 gallery images
    qf = torch.randn(6, 16)
    gf = torch.cat([qf + 0.1 * torch.randn(6, 16), torch.randn(54, 16)])
    pids = [torch.arange(6).numpy(), torch.arange(60).numpy()]
    return dict(
        compute_distance_matrix=torchreid.metrics.compute_distance_matrix,
        qf=qf, gf=gf, distmat=torch.cdist(qf, gf).numpy(),
        q_pids=pids[0], g_pids=pids[1],
        q_camids=torch.zeros(6, dtype=torch.long).numpy(),
        g_camids=torch.ones(60, dtype=torch.long).numpy())


def _guidance_context():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3, stride=4, padding=1)
    linear = torch.nn.Linear(8, 4)

    def head(fmap):  # pooled features -> identity logits, and the features
        pooled = fmap.mean((2, 3))
        return linear(pooled), pooled

    pids = torch.arange(4).repeat_interleave(2)
    return dict(backbone=conv, head=head, pids=pids,
                images=torch.randn(8, 3, 384, 128), model=_pmm18(True))


def _distributed_context():
    from pmm_torchreid.models import PMM
    train = [('img{}_{}.jpg'.format(p, i), p, i % 2) for p in range(20)
             for i in range(8)]
    return dict(dataset=types.SimpleNamespace(train=train), PMM=PMM)


#: module -> the objects its examples use but do not make (the names of a
#: program they are a part of)
CONTEXT = {
    'pmm_torchreid.deploy.export': _export_context,
    'pmm_torchreid.metrics.rank': _rank_context,
    'pmm_torchreid.models.guidance': _guidance_context,
    'pmm_torchreid.utils.distributed': _distributed_context,
    'pmm_torchreid.utils.io': lambda: dict(json=json,
                                           report={'overlap': 0.25}),
}


def test_the_package_has_examples():
    assert sum(len(t.examples) for tests in EXAMPLES.values()
               for t in tests) > 30
    # every context belongs to a module with examples
    assert set(CONTEXT) <= set(EXAMPLES)


@pytest.mark.parametrize('module', sorted(EXAMPLES))
def test_the_examples_run(module, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = CONTEXT.get(module, dict)()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report = []
    # a module's examples in the order of its text, in one namespace (the
    # module's, copied): a later example may use what an earlier one made
    names = dict(vars(importlib.import_module(module)), **extra)
    for test in sorted(EXAMPLES[module], key=lambda t: t.lineno):
        test.globs = names
        runner.run(test, out=report.append, clear_globs=False)
    names.clear()  # the models
    result = runner.summarize(verbose=False)
    assert result.attempted > 0
    assert result.failed == 0, ''.join(report)
