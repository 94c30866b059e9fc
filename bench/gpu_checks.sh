#!/usr/bin/env bash
# The GPU measurements bench/README.md still lacks, in one script for any machine with a CUDA GPU and the training
# requirements installed (pip install -r requirements.txt -r training/requirements.txt, with a CUDA torch).
# Run it from the repository's root:
#
#   bash bench/gpu_checks.sh            both parts, one after the other (an estimated 10 minutes on one H100)
#   bash bench/gpu_checks.sh eager      IDAdapter's training step (SD2.1 size, 512², batch 4, bf16; cached,
#                                       --cache_mb 0, --prefetch_threads 0), the places a step still makes the host
#                                       wait (--sync_debug), and the nodes' UNet overhead at a compute-bound size
#                                       (SD1.5, batch 8, 768², fp16)                                   about 4 minutes
#   bash bench/gpu_checks.sh compiled   the same step with --compile unet vae_decoder arcface and --channels_last
#                                       (inductor's compile is most of it)                             about 6 minutes
#
# Each bench writes its results file into bench/results/; `python bench/report.py` turns them into the tables of
# bench/README.md. The whole output is also kept in runs/gpu_checks.log.
set -u
part=${1:-all}
case "$part" in
    all | eager | compiled) ;;
    *) echo "usage: bash bench/gpu_checks.sh [all|eager|compiled]" >&2; exit 2 ;;
esac
python3 -c "import diffusers, insightface, torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'" \
    || { echo "gpu_checks: needs a CUDA torch and the training requirements (see the header)" >&2; exit 1; }
mkdir -p runs
log=runs/gpu_checks.log
export PYTHONUNBUFFERED=1

measure() {  # measure SCRIPT ARGS...: one bench, its output shown and logged
    echo "== python3 $*" | tee -a "$log"
    python3 "$@" 2>&1 | tee -a "$log"
    echo "== exit ${PIPESTATUS[0]}" | tee -a "$log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$log"
if [ "$part" = eager ] || [ "$part" = all ]; then
    measure bench/train_step.py --rounds 5 --sync_debug
    measure bench/unet_overhead.py --device cuda --dtype fp16 --batch 8 --resolution 768 --rounds 10 \
        --presets speed appearance composition
fi
if [ "$part" = compiled ] || [ "$part" = all ]; then
    measure bench/train_step.py --rounds 5 --compile unet vae_decoder arcface --channels_last
fi
ls -l bench/results
