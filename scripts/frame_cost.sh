#!/usr/bin/env bash
# What one frame of the app costs in CPU on a software renderer: the app idles under Xvfb with
# the prompt focused, so its cursor blink draws a frame every 500 ms (40 in 20 s), and the CPU
# time of all the app's threads plus the X server's over those 20 s is printed. Run it on a
# quiet machine from a release build. Needs Xvfb and xdotool.
#   bash scripts/frame_cost.sh [zipar-studio binary] [ENV=VALUE...]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-target/release/zipar-studio}")
shift || true
tmp=$(mktemp -d)
export HOME=$tmp/home
mkdir -p "$HOME"
export DISPLAY=:$((200 + RANDOM % 100))
Xvfb "$DISPLAY" -screen 0 1280x800x24 >/dev/null 2>&1 &
xv=$!
sleep 2
env "$@" "$bin" >"$tmp/app.log" 2>&1 &
app=$!
trap 'kill $app $xv 2>/dev/null || true; rm -rf "$tmp"' EXIT
sleep 8
xdotool windowfocus "$(xdotool search --name "ZipAR Studio" | head -1)"
# utime + stime in clock ticks (100 a second), every thread of the app and the X server
ticks() {
  local t=0
  for f in /proc/$app/task/*/stat /proc/$xv/stat; do
    t=$((t + $(awk '{print $14 + $15}' "$f")))
  done
  echo $t
}
a=$(ticks)
sleep 20
b=$(ticks)
echo "CPU over 20 s idle (about 40 frames): $(((b - a) * 10)) ms, about $(((b - a) * 10 / 40)) ms a frame"
