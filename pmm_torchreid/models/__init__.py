"""The networks (PMM, its baseline BDB, the comparison systems FMN and
MagnifierNet), their shared heads and backbones, the mixing rules, and the
table under which torchreid builds them."""
from pmm_torchreid.models.bdb import BDB, BatchDropBlock
from pmm_torchreid.models.factory import DEFAULT_BACKBONE, MODEL_FACTORY, NETWORKS, model_backbone
from pmm_torchreid.models.fmn import FMN
from pmm_torchreid.models.heads import GlobalHead, PartHead, Trunk
from pmm_torchreid.models.magnifiernet import MagnifierNet
from pmm_torchreid.models.pmm import PMM

__all__ = ['PMM', 'BDB', 'FMN', 'MagnifierNet', 'BatchDropBlock', 'GlobalHead',
           'PartHead', 'Trunk', 'MODEL_FACTORY', 'NETWORKS', 'DEFAULT_BACKBONE',
           'model_backbone']
