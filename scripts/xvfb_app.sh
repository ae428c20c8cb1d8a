# Sourced by the scripts that drive the real app under Xvfb (screenshot.sh, app_speed.sh).
# `start_app BIN [ENV=VALUE...]`: a fresh HOME (fresh settings) in a temporary folder `$tmp`,
# an Xvfb display at 1280x800, the app started with the given environment and its output in
# `$tmp/app.log`, its window focused (there is no window manager); `$app` is its pid. All of
# it is torn down on exit. Needs Xvfb and xdotool.
start_app() {
  local bin=$1
  shift
  tmp=$(mktemp -d)
  HOME=$tmp/home
  mkdir -p "$HOME"
  export HOME
  local display=:$((100 + RANDOM % 100))
  Xvfb "$display" -screen 0 1280x800x24 >/dev/null 2>&1 &
  xvfb=$!
  export DISPLAY=$display
  sleep 2
  env "$@" "$bin" >"$tmp/app.log" 2>&1 &
  app=$!
  trap 'kill $app $xvfb 2>/dev/null || true; rm -rf "$tmp"' EXIT
  sleep 6
  xdotool windowfocus "$(xdotool search --name "ZipAR Studio" | head -1)"
}

# The built-in model's recommended window (config.json "defaults"), 4 when it names none.
model_window() {
  python3 -c 'import json; print(json.load(open("assets/models/emoji/config.json")).get("defaults", {}).get("window", 4))' 2>/dev/null || echo 4
}
