#!/usr/bin/env bash
# One device call: install missing wheels, build the CUDA extension, run the GPU tests and the benchmarks.
#   bash bench/device_run.sh STAGES...     stages: info build test kbench e2e paper paper1024 profile nokit
#                                          step (bench_step.py, both backends) quality (QUALITY_ARGS for quality.py)
# BUDGET_S=N: every stage's time limit is cut so that the whole call ends within N seconds of its start.
# nokit: the toolkit-free path proved from `pip install` in a stripped environment (no CUDA_HOME, no nvcc on
# PATH, extension disabled): Triton GPU tests + bench_paper --backend triton (set NOKIT_BENCH=0 to skip it).
# Logs go to $OUT (the device tool's output folder) or bench/out.  Carry .whl (SimpleITK, nibabel, pynrrd).
set -u -o pipefail
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DRGS4D_CACHE=${DRGS4D_CACHE:-/tmp/drgs4d_cache} MAX_JOBS=${MAX_JOBS:-16}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
PY=${PY:-python3}
if [ -f .wheels/sitk.tar.xz ]; then  # SimpleITK re-packed smaller, when .whl does not fit the carry limit
  mkdir -p /tmp/site && tar -xJf .wheels/sitk.tar.xz -C /tmp/site
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || echo "wheel install failed"
else
  export PYTHONPATH=$PWD
fi
STAGES=${*:-info build test kbench}
t_all=$(date +%s)
left() {  # seconds left for a stage: min(wanted, BUDGET_S - elapsed)
  local want=$1
  if [ -n "${BUDGET_S:-}" ]; then
    local rest=$(( BUDGET_S - ($(date +%s) - t_all) ))
    [ $rest -lt $want ] && want=$rest
  fi
  [ $want -lt 1 ] && want=1
  echo $want
}
for stage in $STAGES; do
  t0=$(date +%s)
  echo "=== $stage ($(date +%T))"
  case $stage in
    info)
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/info.txt"
      $PY -c "import torch,sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())" | tee -a "$OUT/info.txt"
      nvcc --version | tail -2 | tee -a "$OUT/info.txt"
      ;;
    build)
      DRGS4D_JIT_VERBOSE=0 $PY -c "
import time; t=time.time()
from drgs_core.cuda._backend import load_extension, extension_info
m = load_extension(); print('extension', extension_info(), 'in %.1f s' % (time.time()-t))
assert m is not None" 2>&1 | tee "$OUT/build.log" | tail -20 || { echo "BUILD FAILED"; exit 1; }
      ;;
    test)
      DRGS4D_REQUIRE_CUDA_EXT=1 DRGS4D_TEST_BACKENDS=${TEST_BACKENDS:-cuda-ext,triton} \
        timeout $(left 900) $PY -m pytest Testing/gpu ${TEST_EXTRA:-} -q ${TEST_X--x} -p no:cacheprovider -m "gpu and not slow" \
        -o addopts="" --durations=8 2>&1 | tee "$OUT/tests.log" | tail -40
      ;;
    testall)
      DRGS4D_REQUIRE_CUDA_EXT=1 $PY -m pytest Testing/gpu -q -p no:cacheprovider -o addopts="" --durations=8 2>&1 \
        | tee "$OUT/tests.log" | tail -40
      ;;
    e2e)
      DRGS4D_REQUIRE_CUDA_EXT=1 $PY -m pytest Testing/gpu/test_gpu_end_to_end.py -q -s -p no:cacheprovider \
        -o addopts="" 2>&1 | tee "$OUT/e2e.log" | tail -25
      ;;
    kbench)
      $PY bench/bench_kernels.py --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log" | tail -30
      ;;
    kbenchq)
      $PY bench/bench_kernels.py --quick 2>&1 | tee "$OUT/kernels.log" | tail -30
      ;;
    step)
      timeout $(left 120) $PY bench/bench_step.py --backends cuda-ext triton ${STEP_ARGS:-} 2>&1 | tee "$OUT/step.log" | tail -12
      ;;
    quality)
      ( cd bench && timeout $(left 1200) $PY quality.py --no-append --out /tmp/quality ${QUALITY_ARGS:-} 2>&1 ) \
        | tee "$OUT/quality.log" | grep -E "^\||density:|iso level" | cut -c1-700
      ;;
    paper|paper1024)
      timeout $(left ${PAPER_TIMEOUT:-1200}) $PY bench/bench_paper.py --preset $stage --out /tmp/bench_out --results "$OUT/RESULTS_rows.md" ${PAPER_ARGS:-} 2>&1 \
        | tee "$OUT/$stage.log" | tail -40
      ;;
    profile)
      $PY bench/profile_train.py /tmp/bench_out/paper_case --warmup 300 --iters 40 2>&1 | tee "$OUT/profile.log" \
        | head -120
      ;;
    nokit)
      PYBIN=$(command -v $PY)
      # only the I/O wheels' folder is kept on PYTHONPATH (SimpleITK, nibabel, pynrrd, pydicom)
      KIT="env -i PATH=/usr/bin:/bin HOME=/tmp/nokit_home PYTHONPATH=/tmp/site DRGS4D_BUILD_CUDA=0 DRGS4D_DISABLE_CUDA=1 PYTHONUNBUFFERED=1 PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore"
      mkdir -p /tmp/nokit_home
      {
        # a plain `pip install -e .` (build isolation: torch invisible to setup.py, so nothing is compiled); its
        # build back end comes from .wheels: setuptools, wheel, packaging (no network on the device)
        # (PIP_* in the environment: setuptools' legacy `develop` runs an inner pip that must not go online either)
        $KIT PIP_NO_INDEX=1 PIP_FIND_LINKS=$PWD/.wheels $PYBIN -m pip install --no-deps --use-pep517 -e . \
          > "$OUT/nokit_pip.log" 2>&1 \
          && echo "pip install -e . OK" || { echo "pip install -e . FAILED"; tail -25 "$OUT/nokit_pip.log"; }
        REPO=$PWD
        ( cd /tmp && $KIT $PYBIN -c "
import os, shutil, torch, triton
import drgs_core, drgs_core.cuda as c
print('drgs_core from', drgs_core.__file__, '| nvcc on PATH:', shutil.which('nvcc'), '| CUDA_HOME env:',
      os.environ.get('CUDA_HOME'), '| torch', torch.__version__, 'triton', triton.__version__)
print('backend_report:', c.backend_report('cuda'))
assert c.active_backend('cuda') == 'triton'" )
        if [ "${NOKIT_STEP:-0}" = 1 ]; then  # quick graph-step rate on a synthetic scene
          ( cd /tmp && $KIT $PYBIN $REPO/bench/bench_step.py --backends triton 2>&1 | tail -5 )
        fi
        ( cd /tmp && timeout $(left 300) $KIT DRGS4D_REQUIRE_TRITON=1 DRGS4D_TEST_BACKENDS=triton $PYBIN -m pytest $REPO/Testing/gpu \
            $REPO/Testing/render/test_render_backends.py $REPO/Testing/render/test_triton_voxel.py -q -p no:cacheprovider -m "not slow" -o addopts="" \
            --rootdir=$REPO --durations=5 ${NOKIT_K:+-k "$NOKIT_K"} 2>&1 | tail -25 )
        if [ "${NOKIT_BENCH:-1}" = 1 ]; then
          ( cd /tmp && timeout $(left 300) $KIT $PYBIN $REPO/bench/bench_paper.py --backend triton --reuse-phantom --out /tmp/bench_out \
            --results "$OUT/RESULTS_rows.md" 2>&1 | tail -12 )
        fi
      } 2>&1 | tee "$OUT/nokit.log" | tail -60
      ;;
    *) echo "unknown stage $stage" ;;
  esac
  echo "=== $stage done in $(( $(date +%s) - t0 )) s"
done
echo "=== all stages in $(( $(date +%s) - t_all )) s"
