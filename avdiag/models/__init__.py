"""Reference models and the architecture registry.

``avdiag.models.registry`` holds the registry and the factory (checkpoint tensors -> spec -> model);
each family lives in one module under ``avdiag.models.arch`` (importing this package registers them
all). ``resnet`` is the torchvision-layout ResNet trunk, ``av`` what the audio-visual classifiers
share, ``parts`` what conflict and contribution analyses take from a classifier.
"""

# Importing any family module first runs avdiag.models.arch, which registers every built-in family
# in its order.
from avdiag.models.arch.balance import BalanceMMClassifier
from avdiag.models.arch.crmt import CRMTClassifier
from avdiag.models.arch.legacy_ogm import LegacyOGMClassifier
from avdiag.models.arch.mmpareto import MMParetoClassifier
from avdiag.models.arch.ogm_ge import OGMGEClassifier
from avdiag.models.arch.opm_journal import JournalOPMClassifier
from avdiag.models.arch.resnet import ResNetClassifier
from avdiag.models.av import ConcatFusion, FiLMFusion, GatedFusion, SumFusion
from avdiag.models.resnet import BasicBlock, ResNetEncoder, resnet18, resnet34

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
    "ResNetClassifier",
    "ResNetEncoder",
    "SumFusion",
    "resnet18",
    "resnet34",
]

