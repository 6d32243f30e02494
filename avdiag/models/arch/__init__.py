"""The built-in architecture families, one module each; importing this package registers them all.

Families of equal ``priority`` are tried in registration order, which is the import order below:
the research layouts first (most specific signature first), then the single-modality CNNs.
"""

# isort: skip_file
from avdiag.models.arch import legacy_ogm, opm_journal, balance, mmpareto, crmt, ogm_ge  # noqa: F401
from avdiag.models.arch import av_transformer  # noqa: F401
from avdiag.models.arch import resnet, efficientnet, mobilenet, vgg, crepe  # noqa: F401
