#!/usr/bin/env bash
# One GPU call of the lean quality run (benchmarks/README.md, "Quality with decoders that read their context").
#
#   benchmarks/quality_lean_run.sh DEBIAN_TEXT DECODERS OUT [PLAN] [SECONDS]
#
# DEBIAN_TEXT: a debian_text.jsonl.xz (+ .provenance.json) from `decoder_corpus.py debian` (or a subset of it);
# the PyPI part of the corpus is read from this interpreter's installed distributions, as for the decoders.
# DECODERS: folder with the saved decoders A/ and B/ (benchmarks/decoders.py, or `decoders_run.sh final`).
# OUT: results (JSON, plot, logs.tar.gz). SECONDS (default 585): the whole call, corpus build included.
set -uo pipefail
DEB=$1; DEC=$2; OUT=$3; PLAN=${4:-main}; TOTAL=${5:-585}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python3}
W=${WORK:-/tmp/quality_lean}
export PYTHONUNBUFFERED=1 PYTHONPATH="$(dirname "$HERE"):${PYTHONPATH:-}" TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" "$W"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
stamp "python $($PY -c 'import sys, torch, transformers; print(sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__)')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
if [ ! -f "$W/corpus/PROVENANCE.json" ]; then
  stamp "corpus"
  timeout 200 $PY "$HERE/decoder_corpus.py" build --debian "$DEB" --allow-missing --gzip-level 1 --out "$W/corpus" \
    > "$W/corpus.log" 2>&1 || { stamp "corpus FAILED"; tail -20 "$W/corpus.log"; exit 1; }
  tail -4 "$W/corpus.log"
fi
LEFT=$(( TOTAL - ($(date +%s) - T0) - 15 ))
stamp "quality run, deadline ${LEFT} s"
$PY "$HERE/quality_lean.py" run --corpus "$W/corpus" --decoder A="$DEC/A" --decoder B="$DEC/B" --data "$W/data" \
  --work "$W/run-$(date +%s)" --out "$OUT" --plan "$PLAN" --deadline "$LEFT" ${RUN_ARGS:-} 2>&1 | tee "$OUT/run.log"
stamp "end"
