"""zokern: fast, faithful zeroth-order fine-tuning.

The kernel layer: a counter-based perturbation stream (docs/stream.md) and fused, in-place, multi-tensor passes
that perturb, restore and update parameters without ever storing z.
"""

from zokern import _floors

_floors.require_torch()  # before the modules that use newer torch's APIs as they import

from zokern._dispatch import available_backends
from zokern._dispatch import backend_status
from zokern._reference import STREAM_VERSION
from zokern._version import __version__
from zokern.ops import gaussian
from zokern.ops import perturb_
from zokern.ops import perturb_into_
from zokern.ops import prepare
from zokern.ops import rademacher
from zokern.ops import restore_update_
from zokern.ops import two_seed_
from zokern.optim import replay

__all__ = [
    "STREAM_VERSION",
    "__version__",
    "available_backends",
    "backend_status",
    "gaussian",
    "perturb_",
    "perturb_into_",
    "prepare",
    "rademacher",
    "replay",
    "restore_update_",
    "two_seed_",
]
