"""rayquant's planner: pure Python, standard library only (no torch, ray, transformers or yaml).

    from planner import JobSpec, make_plan, parse_gpu_spec
    plan = make_plan("meta-llama/Llama-3.1-8B", parse_gpu_spec("2x8xH100-80GB,4x1xA10G"), JobSpec())
"""

from planner.architecture import ModelSpec
from planner.calibration import Calibration
from planner.hardware import GpuSpec, NodeType, lookup_gpu, parse_gpu_spec
from planner.memory import MemoryEstimate, estimate_memory, max_seq_len
from planner.model import load_model_spec
from planner.plan import JobSpec, NodePlan, PlanError, TrainingPlan
from planner.search import make_plan
from planner.throughput import tokens_per_second

__all__ = ["Calibration", "GpuSpec", "JobSpec", "MemoryEstimate", "ModelSpec", "NodePlan", "NodeType",
           "PlanError", "TrainingPlan", "estimate_memory", "load_model_spec", "lookup_gpu", "make_plan",
           "max_seq_len", "parse_gpu_spec", "tokens_per_second"]
