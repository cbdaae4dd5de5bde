#!/usr/bin/env bash
# Every GPU check and measurement in one call, sized for a short loan of a GPU machine (at most 9.5 minutes;
# the device tool allows 10 per call). Next calls: train.py --loss-chunk 4096, speedrun.py with 5 seeds.
#   here:            bash ../shared/gpu/stage.sh          (once; .devstage is git-ignored)
#   on the GPU:      bash benchmarks/gpu_run.sh [OUT_DIR]  (the device tool: carry .devstage, OUT_DIR=$OUT)
# Each stage has its own time limit, so one slow stage cannot starve the others; a stage that fails or times out
# is reported and the next one runs. Logs and the updated benchmarks/RESULTS.md land in OUT_DIR (default: gpu-out);
# its GPU sections replace the CPU ones of the same name there: copy them beside the CPU tables by hand.
# Stage limits: estimates for a cold machine (first compile of every graph), 570 s in all.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-out}"
mkdir -p "$out"
if [ -f .devstage/env.sh ]; then
    # shellcheck disable=SC1091
    source .devstage/env.sh
fi
data="${SHAKESPEARE:-tinyshakespeare.txt}"

stage() {  # stage NAME SECONDS COMMAND...
    local name="$1" limit="$2"
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "$name: rc=$rc in $((SECONDS - start)) s (limit $limit s)" | tee -a "$out/summary.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1 || true
python -c "import torch; print(torch.__version__, torch.version.cuda, torch.version.hip)" >> "$out/gpu.txt" 2>&1
stage gpu_tests 150 python -m pytest -q -m gpu tests/test_gpu.py
stage attention_kernel 30 python -c "
import torch
from gptmini.attention import build_attention
from gptmini.config import ModelConfig, AttentionConfig
from gptmini.backend_probe import probe_attention_kernel
for name, hd in [('sdpa', 64), ('sdpa', 8), ('gqa', 64), ('swa', 64)]:
    cfg = ModelConfig(n_layer=1, n_head=12, n_embd=12 * hd, block_size=1024, attention=AttentionConfig(name, window=256 if name == 'swa' else None, n_kv_head=4 if name == 'gqa' else None))
    print(probe_attention_kernel(build_attention(cfg).cuda(), torch.device('cuda'), torch.bfloat16, 1024).line())
"
stage train_gpt2 150 python benchmarks/train.py --models gpt2 gpt2-pad64 --variants sdpa --rounds 2 --steps 5 \
    --warmup 2
stage profile_gpt2 40 python benchmarks/train.py --models gpt2 --variants sdpa --rounds 1 --steps 2 --warmup 1 \
    --eager --profile --no-write   # eager: op names say where the time goes (compiled kernels are fused, renamed)
stage generate 100 python benchmarks/generate.py --models default gpt2 --rounds 2 --tokens 500
# speedrun_gpu alone fits (baseline_gpu on an H100, from the issue: 1.4704 in 44.5 s at 1500 steps); the side by
# side is the next call: speedrun.py --seeds 5 --recipes speedrun_gpu baseline_gpu:train.max_iters=1500
stage speedrun 100 python benchmarks/speedrun.py --data-path "$data" --seeds 1 --recipes speedrun_gpu
cp benchmarks/RESULTS.md "$out/RESULTS.md"
cat "$out/summary.txt"
