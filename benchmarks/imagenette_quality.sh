#!/usr/bin/env bash
# Quality figures for the README: index imagenette's train split, then
# evaluate kNN (k 1, 5, 10, 20; weighted and majority votes) and a linear
# classifier on its val split. Prints each step's wall time.
#
#   benchmarks/imagenette_quality.sh IMAGENETTE_DIR [ENCODER] [WORK_DIR]
set -euo pipefail
data=${1:?usage: $0 IMAGENETTE_DIR [ENCODER] [WORK_DIR]}
encoder=${2:-efficientnet-lite0}
work=${3:-$(mktemp -d)}
bin=${BIN:-.venv/bin}
index="$work/train-$encoder"

timed() { local start=$SECONDS; "$@"; echo "($(( SECONDS - start )) s: $*)" >&2; }

timed "$bin/imgsearch" index "$data/train" --index "$index" --encoder "$encoder"
timed "$bin/imgsearch" evaluate --index "$index" --test "$data/val" -k 1,5,10,20 --vote both
timed "$bin/imgsearch" train-classifier --index "$index"
timed "$bin/imgsearch" evaluate --index "$index" --test "$data/val" -k 10 --format json
