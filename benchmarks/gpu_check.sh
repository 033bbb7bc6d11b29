#!/usr/bin/env bash
# The GPU measurements of docs/performance.md, each part under its own time limit so that one that
# fails or overruns leaves the others' output. Logs go to LOG_DIR, one file per part.
#
#   benchmarks/gpu_check.sh [SHARED_DIR] [LOG_DIR] [PART ...]     (defaults: ../shared, gpu-logs, eager)
#
# Parts: fp16 (timings of bare / ours / auto / prepared, synchronisations inside UNet calls), profile
# (one 10-step generation per variant under torch.profiler, then what ours and auto add over bare,
# operator by operator), bf16 (timings and kernels in bf16), compiled (bare and ours with a compiled
# UNet, 3 repeats), compiled-graphs (bare, ours and prepared subjects with CUDA graphs: mode
# "reduce-overhead", 5 repeats), compiled-auto (bare, ours and auto layout with a compiled UNet, 5
# repeats), compiled-graphs-auto (bare, ours and auto layout with CUDA graphs, 3 repeats), breakdown
# (eager timings of bare / ours / auto, synchronisations, then ours' work outside the denoising loop
# part by part, and a host profile of a 1-step generation), img2img and inpaint (ours against diffusers'
# image-to-image and inpainting pipelines on the same models, 5 repeats each), memory (peak GPU memory and
# time of bare, ours, auto layout, image-encoder offload and model CPU offload, each variant in a process of
# its own: benchmarks/gpu_memory.py), few-steps (4 and 8 steps without a negative branch), training and
# training-cache (`msdiff train` at 1024 px, bf16, batch 1/4/8, with and without activation checkpointing;
# reading the encoders, or a feature cache: benchmarks/gpu_training.py). "eager" is fp16 profile bf16 (about 5
# minutes on an H200 with the start); compiling SDXL's UNet took 95 s (bare) and 116 s (ours) there,
# so "compiled" takes about 5 minutes, "compiled-auto" 6 to 8, and "compiled-graphs-auto" plus
# "breakdown" took 587 s (2026-11-28, H200: 125 s, 129 s and 178 s of compiling).
set -u
shared=${1:-../shared}
logs=${2:-gpu-logs}
shift 2 2>/dev/null || shift $#
parts=("${@:-eager}")
python=${PYTHON:-python3}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1
common=(--shared "$shared" --device cuda --size 1024 --width-divisor 1 --output-type latent --skip-naive)

part() {  # part NAME SECONDS ARGS...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s)"
    timeout "$limit" "$python" benchmarks/adapter_overhead.py "${common[@]}" "$@" >"$logs/$name.log" 2>&1
    echo "exit status $?"
    grep -v -e "^USDT" -e "^ *-\{5,\}" -e "should be kept in float32" "$logs/$name.log" | cut -c1-160
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$python" -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
for p in "${parts[@]}"; do
    case $p in
        eager) set -- fp16 profile bf16 ;;
        *) set -- "$p" ;;
    esac
    for q in "$@"; do
        case $q in
            fp16) part fp16 120 --dtype fp16 --steps 30 --repeats 5 --auto-layout --prepared --sync-check ;;
            profile) part profile 150 --dtype fp16 --steps 10 --repeats 1 --auto-layout --profile --top 10 ;;
            bf16) part bf16 90 --dtype bf16 --steps 10 --repeats 1 --profile --top 4 ;;
            compiled) part compiled 300 --dtype fp16 --steps 30 --repeats 3 --compile ;;
            compiled-graphs) part compiled-graphs 300 --dtype fp16 --steps 30 --repeats 5 --prepared --compile --compile-mode reduce-overhead ;;
            compiled-auto) part compiled-auto 540 --dtype fp16 --steps 30 --repeats 5 --auto-layout --compile ;;
            compiled-graphs-auto) part compiled-graphs-auto 540 --dtype fp16 --steps 30 --repeats 3 --auto-layout --compile --compile-mode reduce-overhead ;;
            breakdown) part breakdown 150 --dtype fp16 --steps 30 --repeats 3 --auto-layout --breakdown --sync-check ;;
            img2img) part img2img 180 --dtype fp16 --steps 30 --repeats 5 --task image-to-image ;;
            inpaint) part inpaint 180 --dtype fp16 --steps 30 --repeats 5 --task inpainting ;;
            few-steps) part few-steps-4 90 --dtype fp16 --steps 4 --guidance 1 --repeats 5
                       part few-steps-8 90 --dtype fp16 --steps 8 --guidance 1 --repeats 5 ;;
            memory)
                echo "=== memory (limit 420 s)"
                timeout 420 "$python" benchmarks/gpu_memory.py --shared "$shared" --steps 30 --repeats 2 \
                    --json "$logs/memory.json" >"$logs/memory.log" 2>&1
                echo "exit status $?"
                grep -v "should be kept in float32" "$logs/memory.log" | cut -c1-200 ;;
            training|training-cache)
                variants=b1,b1-ckpt,b4,b4-ckpt,b8-ckpt
                [ "$q" = training-cache ] && variants=b1-cache,b4-ckpt-cache,b8-ckpt-cache,b8-cache
                echo "=== $q (limit 560 s)"
                timeout 560 "$python" benchmarks/gpu_training.py --shared "$shared" --work /tmp/train-bench \
                    --variants "$variants" --json "$logs/$q.json" >"$logs/$q.log" 2>&1
                echo "exit status $?"
                grep -v -e "should be kept in float32" -e "Writing model shards" "$logs/$q.log" | cut -c1-220 ;;
            *) echo "unknown part $q (fp16, profile, bf16, compiled, compiled-graphs, compiled-auto, compiled-graphs-auto, breakdown, img2img, inpaint, few-steps, memory, training, training-cache, eager)"; exit 2 ;;
        esac
    done
done
