"""A fleet that learns together: robots share heads (weights, class names, label counts), never frames.

:mod:`.update` (numpy: head <-> arrays, class alignment, robust aggregation, local DP) and :mod:`.gate`
(the robot's own gate for a fleet head) import no Flower; :mod:`.server` (``edge-tl fleet-server``) and
:mod:`.client` use Flower (``requirements/fleet.txt``) and are imported only where the fleet is used.
"""
