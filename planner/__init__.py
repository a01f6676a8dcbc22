"""rayquant's planner: pure Python, standard library only (no torch, ray, transformers or yaml)."""

from planner.plan import JobSpec, MemoryBreakdown, NodePlan, PlanError, TrainingPlan, WorkerAssignment

__all__ = ["JobSpec", "MemoryBreakdown", "NodePlan", "PlanError", "TrainingPlan", "WorkerAssignment"]
