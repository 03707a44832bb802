"""Memory accounting: a live-bytes tracker by category and a planner that runs a training step on fake tensors."""
from .planner import PRESETS, PlanResult, add_plan_arguments, plan, run_plan
from .tracker import CATEGORIES, MemoryReport, MemoryTracker

__all__ = ["plan", "PlanResult", "PRESETS", "add_plan_arguments", "run_plan", "MemoryTracker", "MemoryReport",
           "CATEGORIES"]
