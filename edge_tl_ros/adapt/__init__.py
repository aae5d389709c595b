"""On-robot adaptation, without ROS: one concern per module.

- :mod:`.config`     :class:`AdaptConfig` (a round's settings = node parameters), :class:`RoundResult`
- :mod:`.selection`  which frames to keep (:class:`Selector`)
- :mod:`.collector`  frames and labels in, store entries out (:class:`Collector`, the node's data path)
- :mod:`.labels`     pseudo-labels (:func:`pseudo_labels`, the one labelling function)
- :mod:`.round`      a round: split, gather, decide, refit (:func:`run_round`)
- :mod:`.backbone`   the label-free backbone candidate (:func:`backbone_round`) and the choice between the two
- :mod:`.worker`     the round's niced worker process (:func:`run_round_in_subprocess`)
"""

from .backbone import backbone_round, choose
from .config import AdaptConfig, RoundResult
from .labels import LabelModel, ensemble_probs, pseudo_labels
from .round import gather, run_round, stratified_split
from .selection import POLICIES, Selector, informativeness
from .worker import WorkerConfig, run_round_in_subprocess

__all__ = ['backbone_round', 'choose', 'AdaptConfig', 'RoundResult', 'LabelModel', 'ensemble_probs',
           'pseudo_labels', 'gather', 'run_round', 'stratified_split', 'POLICIES', 'Selector',
           'informativeness', 'WorkerConfig', 'run_round_in_subprocess']
