#!/usr/bin/env bash
# The GPU measurements the README's "Measured" section still lacks, as one prepared run on a lent device machine
# (the `device` tool: 15 minutes a session, 10 a command). Two parts, each sized to end inside one 600 s command:
#
#   eager     IDAdapter's training step (SD2.1 size, 512², batch 4, bf16; cached, --cache_mb 0, --prefetch_threads 0),
#             the places a step still makes the host wait (--sync_debug), and the nodes' UNet overhead at a
#             compute-bound size (SD1.5, batch 8, 768², fp16)                                     about 4 minutes
#   compiled  the same step with --compile unet vae_decoder arcface and --channels_last (inductor's compile is
#             most of it)                                                                          about 6 minutes
#
# The device machine has torch, transformers, accelerate and onnxruntime but not diffusers or insightface: carry
# them as wheels. Once, here, in the repository's root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 insightface==2.1
# then run(command="bash bench/gpu_checks.sh eager", carry=[".whl"], timeout_s=600), and at once (the machine stays
# warm for 30 s) the same with "compiled". The results files and the log come back under $OUT; copy them into
# bench/results/ and rebuild the README's tables with `python bench/report.py`.
set -u
part=${1:-all}
out=${OUT:-bench/results}
mkdir -p "$out"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
touch /tmp/gpu_checks.start

measure() {  # measure SECONDS SCRIPT ARGS...: one bench, stopped at SECONDS so that the next one still runs
    local limit=$1
    shift
    echo "== python3 $* (at most ${limit} s)" | tee -a "$out/gpu_checks.log"
    timeout "$limit" python3 "$@" 2>&1 | tee -a "$out/gpu_checks.log" | grep -v -i "warning"
    echo "== exit ${PIPESTATUS[0]}" | tee -a "$out/gpu_checks.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$out/gpu_checks.log"
if [ "$part" = eager ] || [ "$part" = all ]; then
    measure 200 bench/train_step.py --rounds 5 --sync_debug
    measure 150 bench/unet_overhead.py --device cuda --dtype fp16 --batch 8 --resolution 768 --rounds 10 \
        --presets speed appearance composition
fi
if [ "$part" = compiled ] || [ "$part" = all ]; then
    measure 480 bench/train_step.py --rounds 5 --compile unet vae_decoder arcface --channels_last
fi
# the results files this run wrote (bench/common.py writes them into bench/results/)
if [ "$out" != bench/results ]; then
    find bench/results -name '*.json' -newer /tmp/gpu_checks.start -exec cp {} "$out"/ \;
fi
ls -l "$out"
