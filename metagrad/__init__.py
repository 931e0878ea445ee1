"""metagrad: gradient-based meta-learning (MAML and its family) for any ``torch.nn.Module``."""

from metagrad.algorithms.anil import ANIL
from metagrad.algorithms.base import Capabilities, Learner, LearnerSettings
from metagrad.algorithms.baselines import Pretrained
from metagrad.algorithms.blackbox import BlackBox
from metagrad.algorithms.cavia import CAVIA
from metagrad.algorithms.imaml import IMAML
from metagrad.algorithms.maml import MAML
from metagrad.algorithms.mamlpp import MAMLpp
from metagrad.algorithms.metasgd import MetaSGD
from metagrad.algorithms.reptile import Reptile
from metagrad.core.taskbatch import TaskBatch
from metagrad.errors import MetagradError

__all__ = ["ANIL", "CAVIA", "IMAML", "MAML", "BlackBox", "Capabilities", "Learner",
           "LearnerSettings", "MAMLpp", "MetaSGD", "MetagradError", "Pretrained", "Reptile",
           "TaskBatch"]
__version__ = "0.1.0"
