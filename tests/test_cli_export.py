"""scripts/export.py: the strict weight load, the exporter check, the
failure message and the batching of pmm_torchreid.deploy.export, called in-process
(the script itself runs as a subprocess in other test files)."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from pmm_torchreid.deploy import export as E
from pmm_torchreid.utils.checkpoint import save_checkpoint


class Tiny(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.body = nn.Linear(4, 2)
        self.classifier = nn.Linear(2, classes)

    def forward(self, x):
        return self.body(x)


def test_load_export_weights_strips_module_and_exempts_classifiers(tmp_path):
    src = Tiny(classes=7)
    state = {'module.' + k: v for k, v in src.state_dict().items()}
    path = str(tmp_path / 'w.pth.tar')
    save_checkpoint({'state_dict': state}, path)
    dst = Tiny(classes=3)
    assert E.load_export_weights(dst, path, 'tiny') == 2  # body only
    assert torch.equal(dst.body.weight, src.body.weight)
    del state['module.body.bias']
    save_checkpoint({'state_dict': state}, path)
    with pytest.raises(ValueError, match=r"'tiny': 1 missing \(body.bias\)"):
        E.load_export_weights(Tiny(), path, 'tiny')


def test_check_exporter_and_the_failure_message():
    E.check_exporter('torchscript', 11)
    with pytest.raises(ValueError, match='--opset 17: the dynamo exporter'):
        E.check_exporter('dynamo', 17)
    check = {'diffs': {4: 2e-3, 3: 1e-3}, 'max_abs_diff': 2e-3,
             'onnx_vs_float64': 1.0, 'torch_vs_float64': 1e-6}
    assert E.check_summary(check) == '2.00e-03 at batch 4, 1.00e-03 at batch 3'
    message = E.failure_message(check, 0.0, True, '/x/model.onnx')
    assert '--tolerance 0 (2.00e-03 at batch 4' in message
    assert 'float64' not in message and '"/x/model.onnx" was not' in message
    assert 'more than 4 times' in E.failure_message(check, 0.0, False, 'o')


def test_batches_cover_every_image_once():
    assert E.batches(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    model = nn.Linear(3, 2).eval()
    images = torch.randn(5, 3)
    np.testing.assert_allclose(E.run_torch(model, images, 2),
                               E.run_torch(model, images, 5), atol=1e-6)
