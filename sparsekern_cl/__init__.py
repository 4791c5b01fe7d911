"""sparsekern_cl: continual learning on real sparse compute, built on the public sparsekern API.

Run an experiment from Python with :func:`run` (``results = sparsekern_cl.run({"method": "derpp",
"dataset": "mnist", "sparsity": 0.9})``) or from the shell with ``python -m sparsekern_cl``.
Every method is listed in one table, :data:`sparsekern_cl.registry.METHODS`, with its configuration
groups (dataclasses of its keys); methods defined elsewhere plug in through :class:`Plugin` hooks and
:func:`register_method`.  ``run(config, model=..., scenario=...)`` trains your own ``nn.Module`` on your
own per-task data (see :func:`user_scenario`).
"""

__version__ = "0.1.0"

from .buffer import ReservoirBuffer  # noqa: E402
from .config import DEFAULTS, PRESETS, register_config_keys, resolve_config  # noqa: E402
from .data import DATASETS, DatasetError, Scenario, TaskData, build_scenario, user_scenario  # noqa: E402
from .flops import FlopCounter, memory_footprint, model_capacity  # noqa: E402
from .metrics import average_accuracy, backward_transfer, forgetting, forward_transfer  # noqa: E402
from .registry import STRATEGIES, register_method, unregister_method  # noqa: E402
from .runner import evaluate, run  # noqa: E402
from .strategies import Plugin, StepContext, Strategy  # noqa: E402

__all__ = [
    "DATASETS",
    "DEFAULTS",
    "PRESETS",
    "STRATEGIES",
    "DatasetError",
    "FlopCounter",
    "Plugin",
    "ReservoirBuffer",
    "Scenario",
    "StepContext",
    "Strategy",
    "TaskData",
    "average_accuracy",
    "backward_transfer",
    "build_scenario",
    "evaluate",
    "forgetting",
    "forward_transfer",
    "memory_footprint",
    "model_capacity",
    "register_config_keys",
    "register_method",
    "resolve_config",
    "run",
    "unregister_method",
    "user_scenario",
]
