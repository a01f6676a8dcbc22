"""Plan search: per node type the quantization, micro-batch, accumulation, optimizer, checkpointing
and placement that fit its GPUs with the safety margin, and the worker ranks.

  policy.py      which configurations are allowed, and which of two is better
  candidates.py  one configuration's memory and speed; the best per node type
  batching.py    the global batch over node types; pacing warnings
  reasons.py     the one-line reason per choice; what is missing where nothing fits
  assemble.py    make_plan: the above into a TrainingPlan
"""

from planner.search.assemble import make_plan

__all__ = ["make_plan"]
