"""pyowt.planner: cost model, simulator and search for per-layer parallel plans ("auto").

- :mod:`.capture`: the model's layers with the shapes of a global batch (chains and DAGs);
- :mod:`.specs`: device and link specs (H100, A100, V100, K20, CPU; NVLink, PCIe, IB, Ethernet);
- :mod:`.costs`: roofline or measured (cached) compute costs, alpha-beta or fitted collectives;
- :mod:`.tasks` / :mod:`.dag`: the tasks of one training step of a plan;
- :mod:`.simulator`: compute and communication streams per device, incremental re-simulation;
- :mod:`.search`: exact chain DP, MCMC; :mod:`.auto`: :func:`search`, :func:`auto_plan`;
- :mod:`.cli`: ``pyowt plan``.
"""
from .auto import Evaluator, Prediction, SearchResult, auto_plan, preset_configs, search
from .capture import ModelGraph, capture
from .costs import CostModel, Profiler, measure_comm
from .simulator import SimResult, Simulator, Task, simulate
from .specs import DEVICES, LINKS, ClusterSpec, DeviceSpec, LinkSpec, make_cluster

__all__ = [
    "DEVICES", "LINKS", "ClusterSpec", "CostModel", "DeviceSpec", "Evaluator", "LinkSpec", "ModelGraph", "Prediction",
    "Profiler", "SearchResult", "SimResult", "Simulator", "Task", "auto_plan", "capture", "make_cluster",
    "measure_comm", "preset_configs", "search", "simulate",
]
