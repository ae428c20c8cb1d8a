#!/usr/bin/env bash
# Screenshot of the real app under Xvfb: fresh settings, the built-in model, "red apple",
# Compare (NTP and ZipAR side by side), then a hover on a cell of the ZipAR map.
# Needs xvfb-run, xdotool and ImageMagick's `import`.
#   bash scripts/screenshot.sh [out.png] [zipar-studio binary] [view: Image|Pass map|...]
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-docs/screenshot.png}")
bin=$(realpath "${2:-target/release/zipar-studio}")
view=${3:-Pass map}
HOME=$(mktemp -d)
export HOME
xvfb-run -a -s "-screen 0 1280x800x24" bash -c '
  "$0" & pid=$!
  sleep 6
  xdotool mousemove 511 16 click 1          # Compare
  sleep 12
  case "$2" in
    Image) xdotool mousemove 329 75 click 1 ;;
    Overlay) xdotool mousemove 656 75 click 1 ;;
  esac
  sleep 1
  xdotool mousemove 1000 330                 # hover a cell of the right-hand run
  sleep 2
  import -window root "$1"
  kill $pid' "$bin" "$out" "$view"
echo "wrote $out"
