#!/usr/bin/env python
"""The exported descriptor measured: for PyTorch, ONNX Runtime and OpenVINO
and each descriptor choice, the max abs difference to PyTorch on real query
images, the file size and images/s on this CPU (a Markdown table; details:
:mod:`pmm_torchreid.cli.benchmark_export`).  Run it alone.

Examples::

    python scripts/benchmark_export.py --config-file configs/pmm_demo.yaml \\
        --weights log/pmm_demo/model/model.pth.tar-24
    python scripts/benchmark_export.py --config-file configs/pmm_demo.yaml \\
        --weights log/pmm_demo/model/model.pth.tar-24 --descriptors all \\
        --formats pytorch openvino --batch-size 32 --threads 2 \\
        data.height 256 data.width 128
"""
import os.path as osp
import sys
import warnings

warnings.filterwarnings('ignore', message='Cython evaluation')

try:
    import pmm_torchreid  # noqa: F401  (installed: pip install -e .)
except ImportError:  # run from a source tree that is not installed
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from pmm_torchreid.cli.benchmark_export import main

if __name__ == '__main__':
    sys.exit(main())
