#!/usr/bin/env bash
# Build the minimal vision_msgs interface package (tools/vision_msgs) with colcon + rosidl
# from the pip ROS wheels, and install the result into a virtual environment so that
# `from vision_msgs.msg import Classification` works in plain `$VENV/bin/python`.
#
# Usage: tools/build_vision_msgs.sh [VENV]     (default: <repo>/.venv, or $VENV)
#
# What it does:
#   1. Rewrites the wheel-build-machine paths (/opt/python/cp311-cp311/...) baked into the
#      installed CMake export files to this venv's Python include dir and site-packages.
#   2. colcon build of tools/vision_msgs in $VENV/build/vision_msgs_ws (nothing lands in the repo)
#      with AMENT_PREFIX_PATH / CMAKE_PREFIX_PATH pointing at the venv (the wheels install
#      share/<pkg>/cmake and lib/*.so under the venv prefix).
#   3. Copies the result into the venv prefix: lib/*.so -> $VENV/lib (on the LD_LIBRARY_PATH that
#      ros_wheels_bootstrapper sets on every interpreter start), the Python package into
#      site-packages, share/vision_msgs and the ament index entries into $VENV/share.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${VENV:-$REPO_ROOT/.venv}}"
VENV="$(cd "$VENV" && pwd)"
PY="$VENV/bin/python"
SRC="$REPO_ROOT/tools/vision_msgs"
WS="$VENV/build/vision_msgs_ws"

[ -x "$PY" ] || { echo "build_vision_msgs: no python at $PY" >&2; exit 1; }
command -v cmake >/dev/null || { echo "build_vision_msgs: cmake not found (apt-get install cmake)" >&2; exit 1; }

# ros_wheels_bootstrapper re-execs python with a guard variable; start from a clean slate so the
# venv's own library dirs are used even when this script is called from another venv's process.
unset _ROS_WHEELS_BOOTSTRAP_COMPLETE PYTHONHOME || true

PY_INCLUDE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
PYVER="$("$PY" -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')"
PYTAG="cp${PYVER/./}-cp${PYVER/./}"

# 1. Fix the CMake export files of the interface wheels (idempotent).
mapfile -t cmake_files < <(grep -rlF --include='*.cmake' "/opt/python/$PYTAG" "$VENV/share" "$VENV/lib/cmake" 2>/dev/null || true)
if [ "${#cmake_files[@]}" -gt 0 ]; then
  echo "build_vision_msgs: rewriting /opt/python/$PYTAG paths in ${#cmake_files[@]} CMake files"
  sed -i \
    -e "s#/opt/python/$PYTAG/include/python$PYVER#$PY_INCLUDE#g" \
    -e "s#/opt/python/$PYTAG/lib/python$PYVER/site-packages#$SITE#g" \
    "${cmake_files[@]}"
fi

# 2. Build with colcon (from the venv) in a workspace under the venv.
export PATH="$VENV/bin:$PATH"
export AMENT_PREFIX_PATH="$VENV"
export CMAKE_PREFIX_PATH="$VENV"
export PYTHONNOUSERSITE=1
unset COLCON_PREFIX_PATH || true
rm -rf "$WS"
mkdir -p "$WS"
echo "build_vision_msgs: colcon build in $WS"
(
  cd "$WS"
  "$PY" -m colcon --log-base "$WS/log" build \
    --base-paths "$SRC" \
    --build-base "$WS/build" \
    --install-base "$WS/install" \
    --merge-install \
    --event-handlers console_cohesion- console_direct- console_start_end+ summary+ \
    --cmake-args \
      -DCMAKE_BUILD_TYPE=Release \
      -DBUILD_TESTING=OFF \
      "-DPython3_EXECUTABLE=$PY" \
      "-DPython3_INCLUDE_DIR=$PY_INCLUDE" \
      "-DPYTHON_EXECUTABLE=$PY"
) || {
  echo "build_vision_msgs: colcon build failed; logs:" >&2
  find "$WS/log" -name 'stdout_stderr.log' -exec tail -n 60 {} \; >&2 || true
  exit 1
}

# 3. Install the build products into the venv prefix.
INST="$WS/install"
cp -a "$INST"/lib/libvision_msgs__*.so "$VENV/lib/"
rm -rf "$SITE/vision_msgs" "$SITE"/vision_msgs-*.egg-info
cp -a "$INST/lib/python$PYVER/site-packages/vision_msgs" "$SITE/"
for egg in "$INST/lib/python$PYVER/site-packages"/vision_msgs-*.egg-info; do
  [ -e "$egg" ] && cp -a "$egg" "$SITE/"
done
rm -rf "$VENV/share/vision_msgs"
cp -a "$INST/share/vision_msgs" "$VENV/share/"
if [ -d "$INST/include/vision_msgs" ]; then
  mkdir -p "$VENV/include"
  rm -rf "$VENV/include/vision_msgs"
  cp -a "$INST/include/vision_msgs" "$VENV/include/"
fi
for idx in "$INST"/share/ament_index/resource_index/*/vision_msgs; do
  kind="$(basename "$(dirname "$idx")")"
  mkdir -p "$VENV/share/ament_index/resource_index/$kind"
  cp -a "$idx" "$VENV/share/ament_index/resource_index/$kind/"
done

# 4. Smoke check in a plain interpreter (no ROS env vars): import + CDR round trip.
env -u AMENT_PREFIX_PATH -u CMAKE_PREFIX_PATH -u LD_LIBRARY_PATH "$PY" - <<'PYEOF'
from rclpy.serialization import deserialize_message, serialize_message
from vision_msgs.msg import Classification, LabelInfo, ObjectHypothesis, VisionClass, VisionInfo  # noqa: F401

msg = Classification()
msg.header.frame_id = 'camera'
msg.results = [ObjectHypothesis(class_id='stop', score=0.9)]
back = deserialize_message(serialize_message(msg), Classification)
assert back.results[0].class_id == 'stop' and back.header.frame_id == 'camera', back
print('build_vision_msgs: vision_msgs OK')
PYEOF
