"""Reference models: a torchvision-layout ResNet encoder and audio-visual classifiers
whose state_dict keys match the checkpoints of the research codebases."""

from .av import (
    BalanceMMClassifier,
    ConcatFusion,
    CRMTClassifier,
    FiLMFusion,
    GatedFusion,
    JournalOPMClassifier,
    LegacyOGMClassifier,
    MMParetoClassifier,
    OGMGEClassifier,
    SumFusion,
)
from .resnet import BasicBlock, ResNetEncoder, resnet18, resnet34

__all__ = [
    "BalanceMMClassifier",
    "BasicBlock",
    "ConcatFusion",
    "CRMTClassifier",
    "FiLMFusion",
    "GatedFusion",
    "JournalOPMClassifier",
    "LegacyOGMClassifier",
    "MMParetoClassifier",
    "OGMGEClassifier",
    "ResNetEncoder",
    "SumFusion",
    "resnet18",
    "resnet34",
]
