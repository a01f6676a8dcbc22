"""rayquant's planner: pure Python, standard library only (no torch, ray, transformers or yaml)."""

from planner.architecture import ModelSpec
from planner.hardware import GpuSpec, NodeType, lookup_gpu, node_types_from_dicts, parse_gpu_spec
from planner.layermap import layer_device_map
from planner.memory import MemoryEstimate, estimate_memory, max_seq_len
from planner.model import load_model_spec
from planner.plan import JobSpec, MemoryBreakdown, NodePlan, PlanError, TrainingPlan, WorkerAssignment
from planner.search import make_plan
from planner.throughput import tokens_per_second

__all__ = ["GpuSpec", "JobSpec", "MemoryBreakdown", "MemoryEstimate", "ModelSpec", "NodePlan",
           "NodeType", "PlanError", "TrainingPlan", "WorkerAssignment", "estimate_memory",
           "layer_device_map", "load_model_spec", "lookup_gpu", "make_plan", "max_seq_len",
           "node_types_from_dicts", "parse_gpu_spec", "tokens_per_second"]
