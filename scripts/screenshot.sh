#!/usr/bin/env bash
# Screenshots of the real app under Xvfb, as a user drives it: fresh settings, the built-in
# model, "red apple", Compare (NTP and ZipAR side by side), then the replay player:
#   docs/screenshot.png  the pair paused mid-replay (pass 52) in the pass map: the outlined
#                        front is one cell in NTP and a diagonal across rows in ZipAR;
#   docs/race.png        the race as a strip: the Image view at passes 16, 40, 64, 88, 160
#                        and 256 (NTP above, ZipAR below), both advancing at one pass rate;
#   docs/exact.png       NTP and the exact mode in the fate map (accepted / residual / plain).
# ZipAR runs with the model's recommended window (config.json "defaults"), as the app does.
# Needs Xvfb, xdotool and ImageMagick (`import`, `convert`).
#   bash scripts/screenshot.sh [zipar-studio binary] [out dir]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-target/release/zipar-studio}")
out=$(realpath -m "${2:-docs}")
mkdir -p "$out"
# shellcheck source=scripts/xvfb_app.sh
source scripts/xvfb_app.sh
window=$(model_window)
start_app "$bin"
click() { xdotool mousemove "$1" "$2" click 1; sleep "${3:-0.7}"; }
# Type a pass count into the replay's number field (a click opens it for editing).
seek() {
  click 648 98 0.4
  xdotool key ctrl+a
  xdotool type "$1"
  xdotool key Return
  xdotool mousemove 1200 40
  sleep 0.8
}
click 511 16 14 # Compare; both runs finish well within this on 2 cores
seek 52
import -window root "$tmp/full.png"
convert "$tmp/full.png" -crop 1180x760+0+0 +repage "$out/screenshot.png"
click 329 75 # Image view
frames=()
for p in 16 40 64 88 160 256; do
  seek "$p"
  import -window root "$tmp/f.png"
  # the two grids (362 px each at this window size), stacked, labelled
  convert "$tmp/f.png" -crop 362x362+296+134 +repage -resize 200x200 "$tmp/ntp.png"
  convert "$tmp/f.png" -crop 362x362+666+134 +repage -resize 200x200 "$tmp/zip.png"
  convert -size 200x24 xc:'#1b1b1b' -fill white -pointsize 16 -gravity center \
    -annotate +0+0 "pass $p" "$tmp/label.png"
  convert "$tmp/label.png" "$tmp/ntp.png" -size 200x6 xc:'#1b1b1b' "$tmp/zip.png" \
    -append -bordercolor '#1b1b1b' -border 4 "$tmp/frame_$p.png"
  frames+=("$tmp/frame_$p.png")
done
convert -size 90x440 xc:'#1b1b1b' -fill white -pointsize 15 -gravity west \
  -annotate +8-90 "NTP" -annotate +8+116 "ZipAR-$window" "$tmp/side.png"
convert "$tmp/side.png" "${frames[@]}" +append "$out/race.png"
# The exact mode beside NTP, in the fate map.
click 254 195    # Mode: Exact
click 866 75     # Fates view
click 511 16 14  # Compare
xdotool mousemove 900 500 click 5 click 5 click 5  # scroll down to the stats table
xdotool mousemove 1200 40
sleep 1
import -window root "$tmp/full.png"
convert "$tmp/full.png" -crop 1180x760+0+0 +repage "$out/exact.png"
echo "wrote $out/screenshot.png, $out/race.png and $out/exact.png"
