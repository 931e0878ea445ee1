"""Task sources: each returns :class:`TaskBatch` es with a leading task dimension.

:data:`TASKS` names the built-in tasks; a factory is ``factory(config) -> TaskSetup``
(:mod:`metagrad.tasks.base`). Adding a task is one file and one line here.
"""

from metagrad.core.taskbatch import TaskBatch, TaskSampler
from metagrad.registry import Registry
from metagrad.tasks.base import TaskSetup, task
from metagrad.tasks.sinusoid import SinusoidTasks

TASKS: Registry = Registry("task", {
    "sinusoid": "metagrad.tasks.sinusoid:sinusoid_task",
    "omniglot": "metagrad.tasks.omniglot:omniglot_task",
    "miniimagenet": "metagrad.tasks.miniimagenet:miniimagenet_task",
    "folder": "metagrad.tasks.fewshot:folder_task",
})

__all__ = ["TASKS", "SinusoidTasks", "TaskBatch", "TaskSampler", "TaskSetup", "task"]
