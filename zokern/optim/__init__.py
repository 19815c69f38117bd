"""Zeroth-order optimizers as ``torch.optim.Optimizer`` subclasses, driven by the fused kernels of zokern.ops.

Every optimizer takes ``step(closure)``, where the closure evaluates the loss without autograd. See each class for
its rule, the loss ``step`` returns and its extra memory; :mod:`zokern.optim.seeds` for where seeds come from.
"""

from zokern.optim._distributed import RanksDisagree
from zokern.optim.adam import ZOAdam
from zokern.optim.base import ZOOptimizer
from zokern.optim.fzoo import FZOO
from zokern.optim.ldsd import LDSD
from zokern.optim.replay import replay
from zokern.optim.sgd import ZOSGD
from zokern.optim.sgd import ZOConservative
from zokern.optim.sgd import ZOSignSGD

__all__ = [
    "FZOO",
    "LDSD",
    "ZOSGD",
    "RanksDisagree",
    "ZOAdam",
    "ZOConservative",
    "ZOOptimizer",
    "ZOSignSGD",
    "replay",
]
