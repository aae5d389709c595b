"""rosbag2 bags for edge_tl_ros: write/read with the pure-Python ``rosbags`` library (no ROS install
needed), replay with rclpy, and offline evaluation of a model bundle over a bag.

- :mod:`edge_tl_ros.bags.io`: ``write_bag``, ``read_bag``, ``read_labelled_frames``, ``BagError``
- :mod:`edge_tl_ros.bags.replay`: ``Replayer`` (rclpy; the only module here that imports ROS)
- :mod:`edge_tl_ros.bags.evaluate`: ``evaluate_bag`` (in-process pipeline, no transport)
- :mod:`edge_tl_ros.bags.cli`: ``edge-tl make-bag | replay | evaluate-bag``
"""
