#!/usr/bin/env bash
# What one frame of the app costs in CPU on a software renderer: the app idles under Xvfb with
# the prompt focused, so its cursor blink draws a frame every 500 ms (40 in 20 s), and the CPU
# time of all the app's threads plus the X server's over those 20 s is printed. Run it on a
# quiet machine from a release build. Needs Xvfb and xdotool.
# With --results first, a Compare is clicked and finished before: the frames then show two
# finished runs (grids, plots, table) instead of empty grids.
#   bash scripts/frame_cost.sh [--results] [zipar-studio binary] [ENV=VALUE...]
set -euo pipefail
cd "$(dirname "$0")/.."
results=0
if [ "${1:-}" = --results ]; then
  results=1
  shift
fi
bin=$(realpath "${1:-target/release/zipar-studio}")
shift || true
# shellcheck source=scripts/xvfb_app.sh
source scripts/xvfb_app.sh
start_app "$bin" "$@"
if [ $results = 1 ]; then
  xdotool mousemove 511 16 click 1 # Compare
  sleep 4
  xdotool mousemove 200 16 click 1 # back into the prompt: its cursor blinks
  sleep 1
fi
# utime + stime in clock ticks (100 a second), every thread of the app and the X server
ticks() {
  local t=0
  for f in /proc/$app/task/*/stat /proc/$xvfb/stat; do
    t=$((t + $(awk '{print $14 + $15}' "$f")))
  done
  echo $t
}
a=$(ticks)
sleep 20
b=$(ticks)
echo "CPU over 20 s idle (about 40 frames): $(((b - a) * 10)) ms, about $(((b - a) * 10 / 40)) ms a frame"
