#!/usr/bin/env bash
# Runs the cross-implementation tests (engine vs transformers, tensor-parallel vs one rank,
# SGLang's LoRA pool vs peft, cached vs cache-off forwards, kernels vs the reference) under
# every CPU code path torch may take on another machine: this CPU's own, ATen's AVX2 and
# scalar ("default") kernels, and oneDNN capped at AVX2. Their tolerances are derived from
# float32 arithmetic (test/srt/mezo_testing.py), not read off this CPU, so every setting
# must pass. Usage: bash scripts/check_portability.sh [extra pytest args]
set -uo pipefail
cd "$(dirname "$0")/.."
tests=(
  test/srt/test_mezo_sglang.py
  test/srt/test_mezo_tensor_parallel.py
  test/srt/test_mezo_trainer.py::TestKVCacheOptimization
  test/srt/test_mezo_trainer.py::TestMeZOGradientEstimation
  test/srt/test_mezo_triton.py
)
settings=("native" "ATEN_CPU_CAPABILITY=avx2" "ATEN_CPU_CAPABILITY=default" "ONEDNN_MAX_CPU_ISA=AVX2")
failed=()
for setting in "${settings[@]}"; do
  echo "== $setting"
  environment=()
  [ "$setting" = native ] || environment=("$setting")
  env "${environment[@]}" .venv/bin/python -m pytest "${tests[@]}" -q -p no:cacheprovider "$@" || failed+=("$setting")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed under: ${failed[*]}" >&2
  exit 1
fi
echo "every setting passed: ${settings[*]}"
