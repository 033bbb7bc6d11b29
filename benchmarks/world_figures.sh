#!/usr/bin/env bash
# Every figure docs/world.md, docs/img2img-inpainting.md and the README quote for a world build, measured
# again in one go: the evaluation over three seeds, the evaluator's ceiling, where the pattern is lost
# (about 2 minutes), the ablations, the colours' arrangement, inpainting and the sheet of lone subjects
# (docs/images/world-lone-subjects.png). Hours on a 2-core CPU shared with other work (about 12 minutes
# for the evaluations, 25 for inpainting, 15 per ablation); a step whose log says it finished is skipped
# when run again, and the evaluations and ablations resume their own runs.
#
#   benchmarks/world_figures.sh [MODELS] [LOG_DIR]     (defaults: the shipped weights, world-figures)
#
# MODELS: a `msdiff world build --out` folder or its export. QUICK=1 runs every step on a handful of
# images (the script's own check, not figures). Without MODELS (the package's weights) it also runs the
# demo over 8 seeds and the shipped-model tests (whose rates the comment in tests/test_world_model.py
# quotes): both read only the package's weights, so run the script without MODELS once a build is shipped.
set -u
models=${1:-}
logs=${2:-world-figures}
python=${PYTHON:-python3}
mkdir -p "$logs"
with_models=()
[ -n "$models" ] && with_models=(--models "$models")
evaluate=200 ceiling=100 arrangement=96 inpainting=200 per_kind=2 ablations=(--only full no_grounding whole_image_boxes no_boxes)
limits=(--subjects 60 --jobs 40)
if [ "${QUICK:-0}" = 1 ]; then
    evaluate=4 ceiling=4 arrangement=4 inpainting=2 per_kind=1 ablations=(--only no_boxes) limits=(--subjects 2 --jobs 2)
fi

step() {  # step NAME COMMAND...: runs COMMAND unless NAME finished before; its output in LOG_DIR/NAME.log
    local name=$1
    shift
    if [ -f "$logs/$name.done" ]; then
        echo "=== $name: done before (remove $logs/$name.done to measure again)"
        return
    fi
    echo "=== $name ($(date -u +%H:%M))"
    if "$@" >"$logs/$name.log" 2>&1; then
        date -u >"$logs/$name.done"
        grep -e "^|" -e "target" -e " of [0-9]" "$logs/$name.log" | cut -c1-220
    else
        echo "$name failed: see $logs/$name.log"
        tail -5 "$logs/$name.log"
    fi
}

export HF_HUB_OFFLINE=1
for seed in 0 1 2; do
    step "evaluate-$seed" "$python" -m msdiffusion world evaluate "${with_models[@]}" --count "$evaluate" --seed "$seed" \
        --by pattern --by class --by size --output "$logs/evaluate-$seed" --json "$logs/evaluate-$seed.json"
done
step vae-ceiling "$python" benchmarks/world_vae_ceiling.py "${with_models[@]}" --count "$ceiling"
step pattern-limits "$python" benchmarks/world_pattern_limits.py "${with_models[@]}" "${limits[@]}"
step ablations "$python" benchmarks/world_ablations.py "${with_models[@]}" --out "$logs/ablations" "${ablations[@]}"
step arrangement "$python" benchmarks/world_arrangement.py "${with_models[@]}" --count "$arrangement"
step inpainting "$python" benchmarks/world_inpainting.py "${with_models[@]}" --count "$inpainting" \
    --json "$logs/inpainting.json"
step lone-subjects "$python" benchmarks/world_lone_subjects.py "$logs/world-lone-subjects.png" "${with_models[@]}" \
    --per-kind "$per_kind"
if [ -z "$models" ] && [ "${QUICK:-0}" != 1 ]; then
    step demo-seeds "$python" benchmarks/world_demo_seeds.py --seeds 8
    step model-tests "$python" -m pytest -q -s -m slow tests/test_world_model.py -p no:cacheprovider
fi
