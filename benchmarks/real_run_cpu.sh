#!/usr/bin/env bash
# Dry run of benchmarks/real_run.sh on CPU with tiny stand-ins (minutes): every stage, the same configs
# with CPU-sized values, models that are tiny random LMs saved where the real ones would be. Run it
# before spending GPU time on the real run.   bash benchmarks/real_run_cpu.sh [WORK_DIR]
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
export ARC_WORK=${1:-/tmp/arc-dry}
rm -rf "$ARC_WORK" && mkdir -p "$ARC_WORK/models" "$ARC_WORK/corpus" "$ARC_WORK/configs"
export PYTHONPATH="$REPO:${PYTHONPATH:-}" HF_HUB_OFFLINE=1
python3 - "$ARC_WORK" <<'PY'
import shutil, sys, json
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
from arc_encoder.resources import __file__ as res
from arc_encoder.tiny import train_tokenizer
work = Path(sys.argv[1]); res = Path(res).parent
shutil.copytree(res / "tiny_lm", work / "models/smollm2-135m")
text = [json.loads(l)["text"] for l in __import__("gzip").open(res / "pydoc_small/train.jsonl.gz", "rt")][:200]
tok = train_tokenizer(text, vocab_size=301, add_bos=True)
cfg = AutoConfig.for_model("gemma3_text", vocab_size=len(tok), hidden_size=48, intermediate_size=67,
                           num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1, head_dim=16,
                           sliding_window=8, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=0)
AutoModelForCausalLM.from_config(cfg).save_pretrained(work / "models/gemma3-270m")
tok.save_pretrained(work / "models/gemma3-270m")
for m in ("smollm2-135m", "gemma3-270m"):
    (work / "models" / m / "provenance.json").write_text("{}")
for split in ("train", "validation", "test"):
    shutil.copy(res / f"pydoc_small/{split}.jsonl.gz", work / f"corpus/{split}.jsonl.gz")
(work / "corpus/PROVENANCE.json").write_text("{}")
PY
for f in "$REPO"/arc_encoder_train/configs/{smollm2_h200,gemma3_adapt_h200,qa_finetune_h200}.yaml; do
  sed -e 's/accelerator: gpu/accelerator: cpu/' -e 's/precision: bf16-mixed/precision: 32-true/' \
      -e 's/batch_size: [0-9]*/batch_size: 4/' -e 's/num_workers: [0-9]*/num_workers: 0/' \
      -e 's/context_tokens: 256/context_tokens: 32/' -e 's/target_tokens: 256/target_tokens: 16/' \
      -e 's/dtype: bfloat16/dtype: float32/' -e 's/chunk_len: 512/chunk_len: 64/' -e 's/hidden_dim: 2048/hidden_dim: 32/' \
      -e 's/layers_removed: 2/layers_removed: 1/' -e 's/val_batches: [0-9]*/val_batches: 2/' "$f" > "$ARC_WORK/configs/$(basename "$f")"
done
mkdir -p "$ARC_WORK/jobs" && for j in corpus convert-smollm2-135m convert-gemma3-270m; do echo started > "$ARC_WORK/jobs/$j.pid"; echo 0 > "$ARC_WORK/jobs/$j.rc"; done
export ARC_CONFIGS="$ARC_WORK/configs" PRETRAIN_ARGS="--optim.warmup_steps 5" ADAPT_ARGS="--optim.warmup_steps 2" FINETUNE_ARGS="--optim.warmup_steps 2"
R="bash $REPO/benchmarks/real_run.sh"
rm -rf "$ARC_WORK/code" && mkdir -p "$ARC_WORK/code" && cp -r "$REPO"/arc_encoder "$REPO"/arc_encoder_train "$REPO"/benchmarks "$ARC_WORK/code/"
$R calibrate && $R wait calibrate 300
$R pretrain 20 && $R wait pretrain 600
$R adapt 6 && $R wait adapt 300
mkdir -p "$ARC_WORK/qa" && for f in validation test; do head -n 40 "${QA_DIR:-/work/data/qa}/$f.jsonl" > "$ARC_WORK/qa/$f.jsonl"; done
head -n 40 "${QA_DIR:-/work/data/qa}/train.jsonl" | gzip > "$ARC_WORK/qa/train.jsonl.gz"
$R finetune 6 && $R wait finetune 300
$R eval info-smollm2 info checkpoints/smollm2-x4x8 --decoder smollm2 --data corpus/test.jsonl.gz --pooling-factors 4,8 \
  --context-tokens 32 --target-tokens 16 --max-samples 8 --batch-size 4
$R eval qa-smollm2 qa checkpoints/smollm2-x4x8-qa --decoder smollm2 --data qa/test.jsonl --pooling-factors 4,8 --max-rows 6
$R eval qa-gemma3 qa checkpoints/smollm2-x4x8-qa --decoder gemma3 --data qa/test.jsonl --pooling-factors 4,8 --max-rows 6
OUT="$ARC_WORK/out" COLLECT="smollm2-x4x8-qa" $R collect
echo "dry run ok: $ARC_WORK"
