"""edge_tl_ros: a distilled student classifier on ROS 2 camera streams, adapted on the robot.

Where things are:
- a frame enters:        ``edge_tl_ros/nodes/perception_node.py`` (subscription -> newest-frame slot)
- a frame is decoded:    ``edge_tl_ros/imaging.py`` (sensor_msgs fields -> numpy view, no copy)
- a frame is inferred:   ``edge_tl_ros/engine.py`` (ONNX Runtime backbone + numpy head, atomic head swap)
- a bundle is loaded:    ``edge_tl_ros/bundle.py`` (manifest, hashes, validation, head versions)
- a head is trained:     ``edge_tl_ros/headtrain.py`` (class-balanced, regularised toward the current head)

Everything outside ``edge_tl_ros/nodes`` is free of ROS imports.
"""

__version__ = '0.1.0'
