"""Task sources: each returns :class:`TaskBatch` es with a leading task dimension."""

from metagrad.tasks.base import TaskBatch, TaskSampler
from metagrad.tasks.sinusoid import SinusoidTasks

__all__ = ["SinusoidTasks", "TaskBatch", "TaskSampler"]
