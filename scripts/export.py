#!/usr/bin/env python
"""Export a trained model to ONNX or OpenVINO for deployment, checked against
PyTorch.

Same flags and trailing KEY VALUE overrides as scripts/main.py, plus --output,
--format, --normalize, --size, --profile, --opset, --exporter, --num-images,
--batch-size, --tolerance, --strict and --dataset (before the KEY VALUE
pairs).  onnxruntime (and for --format openvino, OpenVINO on the IR) must
reproduce PyTorch on real query images before the .onnx file (or the .xml and
.bin pair) is written; a failed check writes nothing (details:
:mod:`pmm_torchreid.cli.export`, docs/DEPLOYMENT.md).

Examples::

    python scripts/export.py --config-file configs/pmm_demo.yaml \\
        model.load_weights log/pmm_demo/model/model.pth.tar-24
    python scripts/export.py --config-file configs/pmm_market1501.yaml \\
        --root reid-data --output deploy/pmm_market.onnx --opset 18 \\
        model.load_weights log/pmm_market1501/model/model.pth.tar-400
    python scripts/export.py --config-file configs/pmm_demo.yaml \\
        --format openvino --normalize --profile boxmot \\
        model.load_weights log/pmm_demo/model/model.pth.tar-24

Exit status: 0 when the file is written; 1 when the check fails (``Error:
...``) or on a bad config, option value or weights file (a traceback).
"""
import os.path as osp
import sys

try:
    import pmm_torchreid  # noqa: F401  (installed: pip install -e .)
except ImportError:  # run from a source tree that is not installed
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from pmm_torchreid.cli.export import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
