#!/usr/bin/env bash
# The real-LLM run on one GPU machine (benchmarks/README.md, "Real LLMs"), one stage per device call:
# everything that must last lives in $ARC_WORK (default /root/arc), outside the carried working tree,
# and long jobs run in the background (setsid) so that they continue across calls while the machine
# is warm. Every stage prints what it did and the state of every job; `collect` copies results to $OUT.
#
#   bash benchmarks/real_run.sh setup              # wheels, code snapshot, carried pieces (benchmarks/carry.py),
#                                                  # and starts what its inputs allow: corpus, model conversions
#   bash benchmarks/real_run.sh status
#   bash benchmarks/real_run.sh calibrate          # 40 pretrain steps: the step rate that sizes the real run
#   bash benchmarks/real_run.sh pretrain SECONDS   # the shipped trainer, max_steps from the calibrated rate
#   bash benchmarks/real_run.sh wait JOB SECONDS   # until JOB ends or SECONDS pass; prints its log's tail
#   bash benchmarks/real_run.sh adapt SECONDS | make-qa | finetune SECONDS | eval NAME ARGS... | collect
#
# ARC_CONFIGS (default: the shipped arc_encoder_train/configs) and ARC_PYPI (the PyPI part of the corpus)
# let the same script run on CPU with tiny stand-ins (tests/test_real_run.py).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
W=${ARC_WORK:-/root/arc}
CONFIGS=${ARC_CONFIGS:-$W/code/arc_encoder_train/configs}
PYPI=${ARC_PYPI:-"sympy pandas numpy pip pygments setuptools rich click jinja2 requests werkzeug pytest lightning torch"}
PY=${PYTHON:-python3}
mkdir -p "$W/logs" "$W/jobs" "$W/store" "$W/results"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export PYTHONPATH="$W/code:$W/site:${PYTHONPATH:-}"
stamp() { echo "[$(date +%T)] $*"; }

running() { [ -f "$W/jobs/$1.pid" ] && [ ! -f "$W/jobs/$1.rc" ]; }
done_ok() { [ -f "$W/jobs/$1.rc" ] && [ "$(cat "$W/jobs/$1.rc")" = 0 ]; }
# launch NAME CMD...: run in its own session (outlives this call), log to logs/NAME.log, exit code to jobs/NAME.rc
launch() {
  local name=$1; shift
  if running "$name" || done_ok "$name"; then stamp "$name: already started"; return; fi
  rm -f "$W/jobs/$name.rc"
  (cd "$W" && setsid bash -c '"$@" > "logs/$0.log" 2>&1; echo $? > "jobs/$0.rc"' "$name" "$@" < /dev/null &)
  echo started > "$W/jobs/$name.pid"
  stamp "$name: started"
}
status() {
  for f in "$W"/jobs/*.pid; do
    [ -e "$f" ] || continue
    local n; n=$(basename "$f" .pid)
    if [ -f "$W/jobs/$n.rc" ]; then echo "  job $n: exit $(cat "$W/jobs/$n.rc")"; else echo "  job $n: running"; fi
    tail -n 2 "$W/logs/$n.log" 2>/dev/null | tr '\r' '\n' | tail -n 2 | sed 's/^/      /' | cut -c1-220
  done
  ls "$W/models" 2>/dev/null | sed 's/^/  model /'
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null | sed 's/^/  gpu /'
  true
}
# steps that fit SECONDS at the calibrated rate: steps/s between the calibration's last two status lines
# (the model load and first steps excluded), else its summary line
steps_for() {
  $PY - "$W/logs/calibrate.log" "$1" <<'EOF'
import re, sys
text = open(sys.argv[1]).read().replace("\r", "\n")
points = [(int(s), int(h) * 3600 + int(m) * 60 + int(x))
          for s, h, m, x in re.findall(r"step (\d+)/\d+ .*?elapsed (\d+):(\d+):(\d+)", text)]
if len(points) >= 2 and points[-1][1] > points[0][1]:
    rate = (points[-1][0] - points[0][0]) / (points[-1][1] - points[0][1])
else:
    steps, seconds = re.findall(r"done: (\d+) steps in ([0-9.]+) s", text)[-1]
    rate = int(steps) / float(seconds)
print(max(50, int(float(sys.argv[2]) * rate * 0.97)), f"{rate:.2f}")
EOF
}

stage=${1:-status}; shift || true
case $stage in
setup)
  if [ ! -f "$W/site/.done" ] && ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$W/site" "$REPO"/.whl/*.whl \
      && touch "$W/site/.done" && stamp "wheels installed"
  fi
  if ! ls "$W"/jobs/*.pid >/dev/null 2>&1 || [ "${REFRESH_CODE:-0}" = 1 ]; then  # no job uses the snapshot yet
    rm -rf "$W/code" && mkdir -p "$W/code" && cp -r "$REPO"/arc_encoder "$REPO"/arc_encoder_train "$REPO"/benchmarks "$W/code/"
    stamp "code snapshot $(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo '?')"
  fi
  [ -d "$REPO/.carry" ] && $PY "$REPO/benchmarks/carry.py" receive "$REPO/.carry" --store "$W/store"
  [ -d "$REPO/.carry" ] && cp -n "$REPO"/.carry/*.provenance.json "$W/store/" 2>/dev/null
  if [ -d "$REPO/.carry/qa" ]; then mkdir -p "$W/qa" && cp -n "$REPO"/.carry/qa/* "$W/qa/" && stamp "qa: $(cat "$W"/qa/*.jsonl | wc -l) rows"; fi
  if [ -f "$W/store/debian_text.jsonl.xz" ] && [ ! -f "$W/corpus/PROVENANCE.json" ]; then
    launch corpus $PY "$W/code/benchmarks/decoder_corpus.py" build --debian "$W/store/debian_text.jsonl.xz" \
      --pypi $PYPI --allow-missing --gzip-level 1 --fractions 0.91,0.01,0.08 --out "$W/corpus"
  fi
  for pair in "SmolLM2-135M-Instruct.Q4_1.gguf:smollm2-135m" "gemma-3-270m-q4_k_m.gguf:gemma3-270m"; do
    f=${pair%%:*}; m=${pair##*:}
    if [ -f "$W/store/$f" ] && [ ! -f "$W/models/$m/provenance.json" ]; then
      launch "convert-$m" $PY -m arc_encoder.cli.main convert-gguf "$W/store/$f" "$W/models/$m"
    fi
  done
  status ;;
status) status ;;
calibrate)
  done_ok convert-smollm2-135m && [ -f "$W/corpus/PROVENANCE.json" ] || { stamp "calibrate: needs the model and the corpus"; status; exit 1; }
  launch calibrate $PY -m arc_encoder_train.cli pretrain --config "$CONFIGS/smollm2_h200.yaml" \
    --run.name calibrate --trainer.max_steps 40 --optim.warmup_steps 10 --trainer.val_check_interval 1000 \
    --trainer.checkpoint_every_n_steps 1000 --trainer.status_every_s 5 ${CALIBRATE_ARGS:-}
  status ;;
pretrain)
  read -r steps rate < <(steps_for "${1:-540}"); stamp "pretrain: $steps steps for ${1:-540} s at $rate steps/s"
  launch pretrain $PY -m arc_encoder_train.cli pretrain --config "$CONFIGS/smollm2_h200.yaml" --trainer.max_steps "$steps" ${PRETRAIN_ARGS:-}
  status ;;
adapt)
  launch adapt $PY -m arc_encoder_train.cli adapt --config "$CONFIGS/gemma3_adapt_h200.yaml" --trainer.max_steps "${1:-600}" ${ADAPT_ARGS:-}
  status ;;
make-qa)
  mkdir -p "$W/qa"
  for split in train validation test; do
    n=$([ $split = train ] && echo "${QA_TRAIN:-2000}" || echo "${QA_EVAL:-200}")
    (cd "$W" && $PY -m arc_encoder.cli.main eval make-qa "corpus/$split.jsonl.gz" "qa/$split.jsonl" \
      --tokenizer models/smollm2-135m --kinds needle,span --per-kind $((n / 2)) --context-tokens 256 --seed 0) || exit 1
  done
  wc -l "$W"/qa/*.jsonl ;;
finetune)
  launch finetune $PY -m arc_encoder_train.cli finetune --config "$CONFIGS/qa_finetune_h200.yaml" --trainer.max_steps "${1:-400}" ${FINETUNE_ARGS:-}
  status ;;
eval)  # eval NAME arc-encoder-eval-args... (foreground; JSON into results/NAME.json)
  name=$1; shift
  (cd "$W" && $PY -m arc_encoder.cli.main eval "$@" --output "results/$name.json") 2>&1 | tee "$W/logs/eval-$name.log" | tail -n 25 ;;
wait)
  job=$1; limit=${2:-540}; t0=$(date +%s)
  while running "$job" && [ $(( $(date +%s) - t0 )) -lt "$limit" ]; do sleep 5; done
  stamp "$job: $(running "$job" && echo running || echo "exit $(cat "$W/jobs/$job.rc")")"
  tr '\r' '\n' < "$W/logs/$job.log" | grep -v "^\s*$" | tail -n "${TAIL:-15}" | cut -c1-300 ;;
shrink)  # shrink SRC DST: the checkpoint in bfloat16 (the delta and projectors to keep, measured as kept)
  (cd "$W" && $PY - "$1" "$2" <<'EOF'
import sys, torch
from arc_encoder import ARCModel
ARCModel.from_pretrained(sys.argv[1], dtype=torch.bfloat16).save_pretrained(sys.argv[2], overwrite=True)
print(f"wrote {sys.argv[2]} in bfloat16")
EOF
  ) && du -sh "$W/$2" ;;
collect)  # small results into $OUT (device tool: <= 8 files, 16 MiB each)
  out=${OUT:-$W/out}; mkdir -p "$out"
  (cd "$W" && tar czf "$out/results.tar.gz" results logs runs/*/config*.yaml runs/*/summary.txt runs/*/logs 2>/dev/null)
  for ck in ${COLLECT:-}; do  # in 15 MiB pieces: join with cat NAME.tar.part* > NAME.tar
    (cd "$W/checkpoints" && tar cf - "$ck" | split -b 15M -d - "$out/$ck.tar.part") && stamp "$ck: $(du -ch "$out/$ck".tar.part* | tail -1)"
  done
  ls -la "$out" ;;
*) echo "unknown stage $stage"; exit 2 ;;
esac
