"""PyTorch influence methods. See ``infscale.base`` for the sign convention."""

from .base import TorchInfluenceFunctionModel
from .cg import CgInfluence
from .direct import DirectInfluence, NotPositiveDefiniteError
from .ekfac import EkfacInfluence, EkfacLoss, FisherType
from .functional import BlockMode, SecondOrderMode
from .preconditioner import JacobiPreconditioner, NystroemPreconditioner

__all__ = [
    "TorchInfluenceFunctionModel",
    "DirectInfluence",
    "CgInfluence",
    "NotPositiveDefiniteError",
    "BlockMode",
    "SecondOrderMode",
    "JacobiPreconditioner",
    "NystroemPreconditioner",
    "EkfacInfluence",
    "EkfacLoss",
    "FisherType",
]
