#!/usr/bin/env bash
# One-shot development environment for edge_tl_ros (called by `make setup`).
#
#   1. creates .venv (python3.11 -m venv) and upgrades pip
#   2. pip install -r requirements/dev.txt (plain pip: the CPU torch build comes from local disk);
#      with EDGE_TL_TORCH=cuda also requirements/cuda.txt (torch with CUDA + torchvision)
#   3. builds vision_msgs (tools/build_vision_msgs.sh) and installs it into .venv
#   4. installs the ROS 2 launch / ros2cli stack from ../shared/vendor/ros2_launch when that folder is
#      there (`ros2 launch`, `ros2 run`, `ros2 topic` ...; on a robot they come with ROS)
#   5. installs edge_tl_ros itself in editable mode (edge-tl, perception_node, adaptation_node
#      land on .venv/bin), lays it out in the venv as an ament prefix (share/edge_tl_ros,
#      lib/edge_tl_ros/<executable>) and makes AMENT_PREFIX_PATH default to the venv
#   6. writes .venv/.setup-stamp (sha256 of the inputs); a re-run with the same inputs exits at once
#
# Environment: VENV (default <repo>/.venv), PYTHON (default python3.11), SETUP_FORCE=1 to ignore
# the stamp, SETUP_RECREATE=1 to delete and recreate the venv, EDGE_TL_TORCH=cuda for CUDA torch,
# EDGE_TL_ROS2_LAUNCH_SRC (default <repo>/../shared/vendor/ros2_launch; "none" skips it).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
ROS2_LAUNCH_SRC="${EDGE_TL_ROS2_LAUNCH_SRC:-$REPO_ROOT/../shared/vendor/ros2_launch}"
[ -f "$ROS2_LAUNCH_SRC/install_ros2_launch.sh" ] || ROS2_LAUNCH_SRC=""
VENV="${VENV:-$REPO_ROOT/.venv}"
STAMP="$VENV/.setup-stamp"
PIP_VERSION="26.3"

log() { echo "[setup] $*"; }

# Inputs of the environment: when none of these change, nothing needs reinstalling.
stamp_inputs() {
  {
    ls requirements/*.txt
    find tools/vision_msgs -type f
    echo tools/setup_env.sh
    echo tools/build_vision_msgs.sh
    echo setup.py
    echo setup.cfg
    ls launch/*.py
  } | LC_ALL=C sort
}
compute_stamp() {
  # shellcheck disable=SC2046
  { sha256sum $(stamp_inputs)
    if [ -n "$ROS2_LAUNCH_SRC" ]; then (cd "$ROS2_LAUNCH_SRC" && sha256sum ./*.sh ./*.txt); else echo "ros2_launch=none"; fi
    echo "python=${PYTHON:-python3.11} torch=${EDGE_TL_TORCH:-cpu}"; } | sha256sum | cut -d' ' -f1
}

# One setup at a time per checkout (e.g. two `make test` started together): lock this script file.
exec 9<"$REPO_ROOT/tools/setup_env.sh"
if command -v flock >/dev/null && ! flock -n 9; then
  log "waiting for another setup of this checkout to finish"
  flock 9
fi

want="$(compute_stamp)"
if [ "${SETUP_FORCE:-0}" != 1 ] && [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] \
   && [ "$(cat "$STAMP")" = "$want" ]; then
  log "environment up to date ($VENV)"
  exit 0
fi

start=$(date +%s)

# --- 0. system tools needed to build vision_msgs (present on the standard machine image) --------
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v g++ >/dev/null || missing+=(g++)
command -v make >/dev/null || missing+=(make)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing ${missing[*]} with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  else
    echo "[setup] missing tools: ${missing[*]} (install them, e.g. apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi

# --- 1. venv ------------------------------------------------------------------------------------
PYTHON="${PYTHON:-python3.11}"
if ! command -v "$PYTHON" >/dev/null; then
  echo "[setup] $PYTHON not found; Python 3.11 is required" >&2
  exit 1
fi
if [ "${SETUP_RECREATE:-0}" = 1 ] || ! "$VENV/bin/python" -c 'import sys; assert sys.version_info[:2] == (3, 11)' \
     >/dev/null 2>&1; then
  log "creating $VENV"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
fi
rm -f "$STAMP"
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip --disable-pip-version-check --no-input)
# pip with the noise filtered out (the machine's extra file:// indexes warn once per package),
# keeping pip's exit status.
pip_filtered() {
  local rc
  set +e
  "${PIP[@]}" "$@" 2>&1 | grep -v -E '^(Requirement already satisfied|WARNING: Location .* is ignored)'
  rc=${PIPESTATUS[0]}
  set -e
  return "$rc"
}

log "pip $PIP_VERSION"
pip_filtered install -q --progress-bar off --upgrade "pip==$PIP_VERSION"

# --- 2. requirements ------------------------------------------------------------------------------
log "pip install -r requirements/dev.txt"
pip_filtered install --progress-bar off -r requirements/dev.txt
case "${EDGE_TL_TORCH:-cpu}" in
  cpu)
    # a torchvision left from a CUDA set-up does not import beside the CPU torch: remove it
    if "$VPY" -m pip show -q torchvision >/dev/null 2>&1; then
      log "removing torchvision (not used with the CPU torch build)"
      pip_filtered uninstall -y -q torchvision
    fi ;;
  cuda)
    log "pip install -r requirements/cuda.txt (EDGE_TL_TORCH=cuda)"
    pip_filtered install --progress-bar off -r requirements/cuda.txt ;;
  *)
    echo "[setup] EDGE_TL_TORCH must be cpu or cuda, got '${EDGE_TL_TORCH}'" >&2
    exit 1 ;;
esac

# --- 3. vision_msgs ---------------------------------------------------------------------------------
log "building vision_msgs"
bash tools/build_vision_msgs.sh "$VENV"

# --- 4. ros2 launch / ros2cli (from source, offline) -----------------------------------------------
if [ -n "$ROS2_LAUNCH_SRC" ]; then
  log "installing ROS 2 launch + ros2cli from $ROS2_LAUNCH_SRC"
  PIP_DEPS=1 bash "$ROS2_LAUNCH_SRC/install_ros2_launch.sh" "$VENV" "$ROS2_LAUNCH_SRC"
else
  log "no ROS 2 launch sources (../shared/vendor/ros2_launch or \$EDGE_TL_ROS2_LAUNCH_SRC): skipping" \
      "ros2 launch / ros2 run / ros2 topic; on a robot they come with ROS, here use edge-tl up"
fi

# --- 5. this package (editable) --------------------------------------------------------------------
log "pip install -e . (editable)"
pip_filtered install -q --no-deps --no-build-isolation -e .

# share/edge_tl_ros in the venv's ament index, linked to the work tree like colcon --symlink-install
# (pip's editable install does not install data_files; these links are not in pip's RECORD, so a pip
# uninstall/reinstall never deletes through them).
SHARE="$VENV/share/edge_tl_ros"
rm -rf "$SHARE"
mkdir -p "$SHARE" "$VENV/share/ament_index/resource_index/packages"
: > "$VENV/share/ament_index/resource_index/packages/edge_tl_ros"
ln -s "$REPO_ROOT/package.xml" "$SHARE/package.xml"
for d in config models; do
  mkdir -p "$REPO_ROOT/$d"
  ln -s "$REPO_ROOT/$d" "$SHARE/$d"
done
# `ros2 launch PKG FILE` walks share/PKG without following directory links: a real launch/ directory
# with one link per file (as colcon --symlink-install lays it out)
mkdir -p "$SHARE/launch"
for f in "$REPO_ROOT"/launch/*.py; do ln -s "$f" "$SHARE/launch/$(basename "$f")"; done
# `ros2 run` and launch_ros' Node(package=, executable=) look in <prefix>/lib/<package>/ only
rm -rf "$VENV/lib/edge_tl_ros"
mkdir -p "$VENV/lib/edge_tl_ros"
for exe in perception_node perception_lifecycle_node adaptation_node adaptation_lifecycle_node; do ln -s "../../bin/$exe" "$VENV/lib/edge_tl_ros/$exe"; done

# AMENT_PREFIX_PATH defaults to the venv (when unset or empty) in every interpreter of the venv
# (ament_index_python needs it; the pip ROS wheels install their share/ and lib/ under the venv
# prefix). Runs before ros_wheels_bootstrapper.pth (alphabetical order), whose re-exec keeps it.
SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cat > "$SITE/edge_tl_ros_env.pth" <<'EOF'
import os, sys; os.environ['AMENT_PREFIX_PATH'] = os.environ.get('AMENT_PREFIX_PATH') or sys.prefix
EOF

# --- 6. final check + stamp ---------------------------------------------------------------------------
env -u AMENT_PREFIX_PATH -u LD_LIBRARY_PATH -u _ROS_WHEELS_BOOTSTRAP_COMPLETE "$VPY" -c '
from ament_index_python.packages import get_package_share_directory
from vision_msgs.msg import Classification  # noqa: F401
import rclpy  # noqa: F401
get_package_share_directory("edge_tl_ros")
get_package_share_directory("vision_msgs")
'
if [ -n "$ROS2_LAUNCH_SRC" ]; then
  env -u AMENT_PREFIX_PATH -u LD_LIBRARY_PATH -u _ROS_WHEELS_BOOTSTRAP_COMPLETE \
    "$VENV/bin/ros2" pkg executables edge_tl_ros | grep -q perception_node \
    || { echo "[setup] ros2 does not find edge_tl_ros' executables" >&2; exit 1; }
  log "ros2 launch edge_tl_ros edge_tl.launch.py / ros2 run edge_tl_ros perception_node: ready"
fi
echo "$want" > "$STAMP"
log "done in $(( $(date +%s) - start )) s; use $VENV/bin/python (no activation or sourcing needed)"
