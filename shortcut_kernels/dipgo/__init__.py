"""DiP-GO: learned (or hand-made) block-cache schedules for diffusion sampling.

    from shortcut_kernels.dipgo import accelerate, deepcache, skip_steps
    s = deepcache(pipe, calls=50, interval=3, branch=0)     # a Schedule
    with accelerate(pipe, s):                               # the handle is a context manager
        images = pipe(prompt_embeds=..., num_inference_steps=50).images

:class:`Schedule`, the builders and ``accelerate`` live in :mod:`shortcut_kernels.runtime` (below
DiP-GO and SDO) and are re-exported here; :mod:`.postprocess` - a pruner's scores into a
schedule; :mod:`.learn` - the estimate-guided learner; :mod:`.search` -
``local_search`` (a schedule learned by validated moves on training noise).
This module stays light: importing it loads no model.
"""
from ..runtime import (COMPUTE, DEAD, FORECAST, READ, Accelerated, CacheState, Schedule, accelerate, deepcache, fora,
                       full, skip_steps)
from .postprocess import from_ranking, from_scores
from .search import local_search

__all__ = ["Schedule", "accelerate", "Accelerated", "CacheState", "full", "deepcache", "skip_steps", "fora",
           "from_scores", "from_ranking", "local_search", "COMPUTE", "READ", "DEAD", "FORECAST"]
