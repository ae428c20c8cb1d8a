#!/usr/bin/env bash
# The app's decoding speed against the CLI's, on the built-in model (issue "Speed"): the real
# app under Xvfb with fresh settings, "Compare" clicked N times (NTP and ZipAR at the model's
# window, the default prompt), its per-run log lines (RUST_LOG=info) read back; then the CLI's
# `bench` on the same prompt, modes and number of images, in the same script. Prints each
# side's median decode time and the Compare speed-up. Run it on a quiet machine, from a
# release build. Needs Xvfb and xdotool.
#   bash scripts/app_speed.sh [zipar-studio binary] [clicks]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-target/release/zipar-studio}")
clicks=${2:-6}
# shellcheck source=scripts/xvfb_app.sh
source scripts/xvfb_app.sh
window=$(model_window)
start_app "$bin" "RUST_LOG=${RUST_LOG:-info}"
for _ in $(seq "$clicks"); do
  xdotool mousemove 511 16 click 1 # Compare
  sleep 4
done
kill $app 2>/dev/null || true
# the CLI's side runs on a quiet machine: the app has exited and its frames are over
wait $app 2>/dev/null || true
sleep 1
median() { sort -n | awk '{a[NR]=$1} END {if (NR == 0) print "nan"; else if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
app_ms() { grep "finished: $1 " "$tmp/app.log" | sed -E 's/.*decode ([0-9.]+) ms.*/\1/' | median; }
app_ntp=$(app_ms ntp)
app_zip=$(app_ms zipar)
echo "app (${clicks} Compare clicks): $(grep -c 'finished:' "$tmp/app.log") runs logged"
grep "finished:" "$tmp/app.log" | sed -E 's/^.*run /  run /'
seeds=$(seq -s, 0 $((clicks - 1)))
"$bin" bench --prompt "red apple" --windows "$window" --seeds "$seeds" --json "$tmp/bench.json" >"$tmp/bench.txt" 2>&1
cli_ms() { python3 -c "import json,sys; r=[x for x in json.load(open('$tmp/bench.json')) if x['setting']['mode']=='$1']; print(r[0]['median_ms'])"; }
cli_ntp=$(cli_ms ntp)
cli_zip=$(cli_ms zipar)
python3 - "$app_ntp" "$app_zip" "$cli_ntp" "$cli_zip" "$window" <<'EOF'
import sys
an, az, cn, cz, w = map(float, sys.argv[1:])
print(f"median decode ms     app     CLI    app/CLI")
print(f"ntp              {an:7.1f} {cn:7.1f}   {an / cn:5.2f}x")
print(f"zipar-{int(w):<2d}         {az:7.1f} {cz:7.1f}   {az / cz:5.2f}x")
print(f"Compare speed-up   {an / az:5.2f}x  {cn / cz:5.2f}x  (app / CLI {an / az / (cn / cz):.2f})")
EOF
