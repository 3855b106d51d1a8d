#!/usr/bin/env bash
# One GPU session of the stand-in decoder recipe (benchmarks/README.md, "Stand-in decoders").
#
#   benchmarks/decoders_run.sh MODE DEBIAN_TEXT RESULTS [WORK]
#
# MODE grid:  corpus -> tokenizers A (8192) and B (12288) -> token arrays -> the copying grid
# MODE final: corpus -> tokenizers -> token arrays -> decoders A and B (at once) -> probe on test
# MODE tokens: corpus -> tokenizers -> token arrays only (TOKS="B" for one of them)
# DEBIAN_TEXT is debian_text.jsonl.xz (+ its .provenance.json) from `decoder_corpus.py debian`;
# the PyPI part is read from this interpreter's installed distributions (RECORD-checked).
# Everything small lands in RESULTS; decoders in RESULTS/decoders/{A,B}. Each step has a
# timeout, so a slow step leaves the earlier results in place.
set -uo pipefail
MODE=$1; DEB=$2; RES=$3; W=${4:-/tmp/decoders_work}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$(dirname "$HERE"):${PYTHONPATH:-}"
mkdir -p "$RES" "$W"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

stamp "python $($PY -c 'import sys, torch, transformers, tokenizers; print(sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "tokenizers", tokenizers.__version__)')"
$PY -m pip list --format=freeze > "$RES/pip_freeze.txt" 2>/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$RES/gpu.txt" 2>&1

if [ ! -f "$W/corpus/PROVENANCE.json" ]; then
  stamp "corpus"
  timeout 300 $PY "$HERE/decoder_corpus.py" build --debian "$DEB" --allow-missing --gzip-level 1 --out "$W/corpus" ${CORPUS_ARGS:-} \
    > "$RES/corpus.log" 2>&1 || { stamp "corpus FAILED"; tail -20 "$RES/corpus.log"; exit 1; }
fi
cp "$W/corpus/PROVENANCE.json" "$RES/corpus_PROVENANCE.json"; tail -4 "$RES/corpus.log"

tok() {  # name vocab
  if [ ! -f "$W/tok$1/tokenizer.json" ]; then
    timeout 300 $PY "$HERE/decoders.py" tokenizer --corpus "$W/corpus" --vocab-size "$2" --out "$W/tok$1" ${TOKENIZER_ARGS:-} || return 1
  fi
  timeout 300 $PY "$HERE/decoders.py" tokenize --corpus "$W/corpus" --tokenizer "$W/tok$1" --out "$W/tokens$1" --workers 7 || return 1
  mkdir -p "$RES/tokenizer$1" && cp "$W/tok$1"/* "$RES/tokenizer$1/" && cp "$W/tokens$1/stats.json" "$RES/tokens$1_stats.json"
}
stamp "tokenizers + token arrays"
declare -A VOCAB=([A]=8192 [B]=12288)
declare -A PIDS=()
for n in ${TOKS:-A B}; do tok $n ${VOCAB[$n]} > "$RES/tok$n.log" 2>&1 & PIDS[$n]=$!; done
for n in ${TOKS:-A B}; do
  wait ${PIDS[$n]} || { stamp "tokens $n FAILED"; tail -20 "$RES/tok$n.log"; exit 1; }
  tail -n 2 "$RES/tok$n.log"
done

if [ "$MODE" = grid ]; then
  stamp "grid"
  OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1 timeout ${GRID_TIMEOUT:-420} $PY "$HERE/decoders.py" grid --tokens "$W/tokensA" --tokenizer "$W/tokA" \
    --out "$RES/grid" --time-limit ${GRID_LIMIT:-330} ${GRID_ARGS:-} 2>&1 | tail -30
elif [ "$MODE" = final ]; then
  stamp "decoders A and B"
  for n in A B; do
    OMP_NUM_THREADS=2 timeout ${FINAL_TIMEOUT:-420} $PY "$HERE/decoders.py" train --preset $n --tokens "$W/tokens$n" \
      --tokenizer "$W/tok$n" --name $n --log "$RES/train_$n.json" --save "$W/decoders/$n" --probe-split validation \
      --time-limit ${FINAL_LIMIT:-330} ${FINAL_ARGS:-} > "$RES/train_$n.log" 2>&1 &
  done
  wait
  tail -n 3 "$RES/train_A.log" "$RES/train_B.log"
  for n in A B; do
    stamp "probe $n on test (reloaded bf16 weights)"
    timeout 120 $PY "$HERE/decoders.py" probe "$W/decoders/$n" --tokens "$W/tokens$n" --split test --out "$RES/probe_$n.json"
  done
  mkdir -p "$RES/decoders" && cp -r "$W/decoders/A" "$W/decoders/B" "$RES/decoders/"
fi
stamp "end"
