"""The planner: cost model, DP partitioning, GA clustering, PREFILL/DECODE roles, plans, baselines.

Pure, deterministic code with no I/O (its command line is :mod:`meshllm.cli.plan`), shared
by the elected planner node, ``meshllm plan`` and the simulator. Data flow:
devices + :class:`ModelCosts` -> :class:`CostModel` -> DP per group
(:mod:`~meshllm.plan.partition`) -> roles and queueing objective
(:mod:`~meshllm.plan.system`, :mod:`~meshllm.plan.objective`) -> GA over
groupings (:mod:`~meshllm.plan.ga`) -> candidates elected by a short simulation
(:mod:`~meshllm.plan.elect`) -> :class:`Plan`. See docs/planner.md.
"""

from meshllm.plan.baselines import BASELINES
from meshllm.plan.calibrate import ErrorReport, Sample, fit_factors, prediction_error
from meshllm.plan.cost import CostModel, DeviceFactors, ModelCosts, Work
from meshllm.plan.devices import DeviceClass, load_device_classes, parse_devices
from meshllm.plan.errors import PlanError
from meshllm.plan.objective import Metrics
from meshllm.plan.partition import Infeasible, Partition, partition
from meshllm.plan.plan import PLAN_FORMAT_VERSION, Plan, Replica, Role, Stage, should_replace
from meshllm.plan.planner import METHODS, plan_mesh, replan, rescore, system_model
from meshllm.plan.system import PlanOptions, SystemModel
from meshllm.plan.workload import LengthDist, Workload

__all__ = [
    "BASELINES",
    "METHODS",
    "PLAN_FORMAT_VERSION",
    "CostModel",
    "DeviceClass",
    "DeviceFactors",
    "ErrorReport",
    "Infeasible",
    "LengthDist",
    "Metrics",
    "ModelCosts",
    "Partition",
    "Plan",
    "PlanError",
    "PlanOptions",
    "Replica",
    "Role",
    "Sample",
    "Stage",
    "SystemModel",
    "Work",
    "Workload",
    "fit_factors",
    "load_device_classes",
    "parse_devices",
    "partition",
    "plan_mesh",
    "prediction_error",
    "replan",
    "rescore",
    "should_replace",
    "system_model",
]
