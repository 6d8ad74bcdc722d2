#!/usr/bin/env bash
# One device call for bench/quality.py: install the I/O wheels, build the CUDA extension, run the quality matrix.
#   bash bench/device_quality.sh [quality.py arguments]      (logs and tables go to $OUT or bench/out_quality)
# Wheels: devwhl/*.whl, or devwhl/sitk*.tar.xz (an unpacked SimpleITK wheel re-packed with xz -1: 32 MB instead
# of the 53 MB wheel, for carry limits), else ../../.whl/*.whl.
set -u -o pipefail
OUT=${OUT:-bench/out_quality}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DRGS4D_CACHE=${DRGS4D_CACHE:-/tmp/drgs4d_cache} MAX_JOBS=${MAX_JOBS:-16}
mkdir -p /tmp/site
for w in devwhl/*.whl ../../.whl/simpleitk*.whl ../../.whl/nibabel*.whl ../../.whl/pynrrd*.whl; do
  [ -f "$w" ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$w"
done
for x in devwhl/*.tar.xz; do [ -f "$x" ] && tar -xJf "$x" -C /tmp/site; done
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/info.txt"
python3 -c "from drgs_core.cuda._backend import load_extension, extension_info; assert load_extension() is not None; print(extension_info())" \
  > "$OUT/build.log" 2>&1 || { echo "BUILD FAILED"; tail -20 "$OUT/build.log"; exit 1; }
ARGS=${*:---size 256,128 --runs paper:30:fast hard:30:fast paper:30:full hard:30:full paper:20:fast paper:10:fast hard:30:fast:off demo:30:fast}
timeout ${QUALITY_TIMEOUT:-3000} python3 bench/quality.py --out /tmp/q --results "$OUT/RESULTS_quality.md" $ARGS 2>&1 \
  | grep -v -i warn | tee "$OUT/quality.log" | tail -40
cp /tmp/q/quality_rows.md /tmp/q/quality.json "$OUT/" 2>/dev/null
