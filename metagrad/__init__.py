"""metagrad: gradient-based meta-learning (MAML and its family) for any ``torch.nn.Module``."""

from metagrad.algorithms.maml import MAML
from metagrad.errors import MetagradError
from metagrad.tasks.base import TaskBatch

__all__ = ["MAML", "MetagradError", "TaskBatch"]
__version__ = "0.1.0"
