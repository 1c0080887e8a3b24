"""The cache runtime: block-cache schedules and the runtime that samples with them, below both
algorithm layers (DiP-GO learns schedules; SDO runs its no-graph chain through one).

:mod:`.schedule` - :class:`Schedule` and its JSON; :mod:`.builders` - hand-made schedules;
:mod:`.resize` - mapping a schedule to another number of calls; :mod:`.cache` - ``accelerate``;
:mod:`.forecast` - forecast reuse (a reused block's output extrapolated from its last computed ones).
Users reach the same names through :mod:`shortcut_kernels.dipgo`.
"""
from .builders import deepcache, fora, full, skip_steps
from .cache import Accelerated, CacheState, accelerate
from .schedule import COMPUTE, DEAD, FORECAST, READ, Schedule

__all__ = ["Schedule", "accelerate", "Accelerated", "CacheState", "full", "deepcache", "skip_steps", "fora",
           "COMPUTE", "READ", "DEAD", "FORECAST"]
