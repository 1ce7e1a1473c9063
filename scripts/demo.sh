#!/usr/bin/env bash
# Index sample_data/, then run a query and a classification and print them.
# Works offline: without ResNet50's ImageNet weights it uses efficientnet-lite0,
# whose weights ship in a pip package.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
INDEX=${DEMO_INDEX:-demo-index}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3}

rm -rf "$INDEX"
encoder=resnet50
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if "$BIN/imgsearch" index sample_data/labelled --index "$INDEX" --encoder resnet50 2>"$log"; then
    cat "$log" >&2
else
    reason=$(grep '^Error:' "$log" | head -n 1 | cut -c 8-)
    echo "resnet50 is not usable here (${reason:-see above}); using efficientnet-lite0"
    encoder=efficientnet-lite0
    rm -rf "$INDEX"
    "$BIN/imgsearch" index sample_data/labelled --index "$INDEX" --encoder "$encoder"
fi

echo
echo "== encoder used: $encoder"
"$BIN/imgsearch" info --index "$INDEX"
echo
echo "== query: the 3 most similar indexed photos"
"$BIN/imgsearch" query sample_data/queries/church.jpg sample_data/queries/tench.jpg --index "$INDEX" -k 3
echo
echo "== classify: a 20-nearest-neighbour vote for each query photo"
"$BIN/imgsearch" classify sample_data/queries/*.jpg --index "$INDEX"
