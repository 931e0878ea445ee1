"""The MAML family. :data:`ALGORITHMS` names every built-in learner (the protocol is in
:mod:`metagrad.algorithms.base`); adding an algorithm is one file and one line here."""

from metagrad.registry import Registry

ALGORITHMS: Registry = Registry("algorithm", {
    "maml": "metagrad.algorithms.maml:MAML",
    "metasgd": "metagrad.algorithms.metasgd:MetaSGD",
    "mamlpp": "metagrad.algorithms.mamlpp:MAMLpp",
    "anil": "metagrad.algorithms.anil:ANIL",
    "reptile": "metagrad.algorithms.reptile:Reptile",
    "imaml": "metagrad.algorithms.imaml:IMAML",
    "cavia": "metagrad.algorithms.cavia:CAVIA",
    "blackbox": "metagrad.algorithms.blackbox:BlackBox",
    "pretrained": "metagrad.algorithms.baselines:Pretrained",
})
