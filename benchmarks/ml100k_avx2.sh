#!/bin/bash
# The README's main job as on a 2-core AVX2-only AMD CPU (before Zen 4: oneDNN, no VNNI, float32 generation),
# emulated on a newer x86 CPU by limiting every engine to AVX2 code paths; an empty cache, every output line
# time-stamped, /usr/bin/time's summary at the end (docs/results.md, "ml-100k on an AVX2 code path").
#
#   bash benchmarks/ml100k_avx2.sh OUT_DIR [CACHE_DIR]     # CACHE_DIR: default OUT_DIR/cache (made empty)
#   QUANTIZATION=int8 bash benchmarks/ml100k_avx2.sh OUT_DIR   # the int8 trade instead of float32
set -euo pipefail
out=${1:?usage: bash benchmarks/ml100k_avx2.sh OUT_DIR [CACHE_DIR]}
root=$(cd "$(dirname "$0")/.." && pwd)
export CT2_FORCE_CPU_ISA=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2
export CT2_USE_MKL=0
export RECLM_CACHE=${2:-$out/cache}
mkdir -p "$out" "$RECLM_CACHE"
# configs/ml-100k.yaml with the precision an AVX2-only AMD CPU gets by default (this CPU may have VNNI)
precision=${QUANTIZATION:-float32}
sed -e "s/^  quantization: null .*/  quantization: $precision/" "$root/configs/ml-100k.yaml" > "$out/ml100k-avx2.yaml"
grep -q "^  quantization: $precision\$" "$out/ml100k-avx2.yaml"
/usr/bin/time -v "$root/.venv/bin/reclm" run "$out/ml100k-avx2.yaml" --out "$out/run" 2>&1 |
    while IFS= read -r line; do printf '%s %s\n' "$(date +%T)" "$line"; done
