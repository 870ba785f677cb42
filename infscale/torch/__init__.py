"""PyTorch influence methods. See ``infscale.base`` for the sign convention."""

from .arnoldi import ArnoldiInfluence
from .base import TorchInfluenceFunctionModel
from .cg import CgInfluence
from .direct import DirectInfluence, NotPositiveDefiniteError
from .ekfac import EkfacInfluence, EkfacLoss, FisherType
from .inverse_harmonic_mean import InverseHarmonicMeanInfluence
from .layout import BlockMode, SecondOrderMode
from .lissa import LissaDivergenceError, LissaInfluence
from .nystroem import NystroemSketchInfluence
from .preconditioner import JacobiPreconditioner, NystroemPreconditioner

__all__ = [
    "TorchInfluenceFunctionModel",
    "DirectInfluence",
    "CgInfluence",
    "LissaInfluence",
    "LissaDivergenceError",
    "ArnoldiInfluence",
    "NystroemSketchInfluence",
    "InverseHarmonicMeanInfluence",
    "NotPositiveDefiniteError",
    "BlockMode",
    "SecondOrderMode",
    "JacobiPreconditioner",
    "NystroemPreconditioner",
    "EkfacInfluence",
    "EkfacLoss",
    "FisherType",
]
