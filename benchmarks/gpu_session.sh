#!/usr/bin/env bash
# Every GPU check of the project in one bounded run, for a short lease on a GPU machine.
#
#   DAO_BENCH_COMMIT=$(git rev-parse HEAD) OUT=/tmp/gpu bash benchmarks/gpu_session.sh [SECONDS]
#
# Steps, in order of value, each cut to what is left of the SECONDS budget (default
# 540): build and install the package with the CUDA sources; the GPU tests (the
# Triton kernels and the dense backend compiled on CUDA against their float64 twins,
# the CUDA neighbour list, CUDA-graph sampling); the training-step benchmark
# (reference / factorized / fused (Triton) / fused-dense, eager and with the step
# captured in a CUDA graph, paper and shipped sizes, MP-20 and MPTS-52 batches); the
# sampling benchmark (with the CUDA-graph providers); a torch.profiler summary of one
# training step per provider (profile.txt); a 30-second `dao train` on the GPU (bf16
# autocast); and, if time is left, the torch.compile reference row at MPTS-52 size.
# CSVs, steps.log and tests.xml go to $OUT (default benchmarks/results/gpu), every
# step's full log into $OUT/logs.tgz (few files: a lease returns at most eight).
# STEPS="build tests ..." runs a subset; TESTS="..." replaces the test selection.
# The data must be at ../shared/data or in .devdata/shared/data (a copy the lease carries, with the
# processed-CSV cache in .devdata/cache: the GPU image has no pymatgen to process it);
# benchmarks/prepare_gpu_data.sh builds .devdata.
set -u
BUDGET=${1:-540}
START=$(date +%s)
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT/logs"
STEPS=${STEPS:-"build tests bench_train bench_sampling profile train_smoke bench_compile"}
want() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

left() { echo $((BUDGET - ($(date +%s) - START))); }
step() {  # step NAME CAP CMD...: run CMD with a timeout of min(CAP, time left), log to $OUT
  # (SIGINT at the limit: pytest reports the tests run so far, the benchmarks write the
  # rows measured so far)
  local name=$1 cap=$2; shift 2
  want "$name" || return 0
  local t; t=$(left); [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 20 ]; then echo "== $name: skipped, $(left) s left" | tee -a "$OUT/steps.log"; return; fi
  echo "== $name (cap ${t} s) $(date -u +%T)" | tee -a "$OUT/steps.log"
  local t0; t0=$(date +%s)
  timeout -s INT -k 20 "$t" "$@" >"$OUT/logs/$name.log" 2>&1
  local rc=$?
  echo "== $name rc=$rc in $(($(date +%s) - t0)) s" | tee -a "$OUT/steps.log"
  tail -n 25 "$OUT/logs/$name.log"
}

if [ ! -e ../shared/data ] && [ -d .devdata/shared/data ]; then
  ln -s "$PWD/.devdata/shared" ../shared
fi
[ -d .devdata/cache ] && export DAO_CACHE_DIR="$PWD/.devdata/cache"

{
  nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print(torch.cuda.get_device_name())"
  nvcc --version | tail -n 2; nproc
} >"$OUT/logs/env.log" 2>&1
cat "$OUT/logs/env.log"

# DAO_ENABLE_CUDA=OFF skips the CUDA sources (the CUDA neighbour list) to save build time.
step build 300 env DAO_ENABLE_CUDA="${DAO_ENABLE_CUDA:-ON}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  CMAKE_ARGS="-DDAO_CUDA_ARCHITECTURES=90" \
  $PY -m pip install --no-build-isolation --no-deps -q .
$PY -c "import dao._C as c; print('dao._C', c.__file__, 'cuda', c.WITH_CUDA, c.PARALLEL_BACKEND)" | tee -a "$OUT/steps.log"

TESTS=${TESTS:-"tests/ops/test_edge_attention_triton.py tests/ops/test_edge_attention_dense.py \
  tests/ops/test_neighbor_list_triton.py \
  tests/ops/test_diffusion_step.py tests/diffusion/test_fused_sampling.py \
  tests/ops/test_neighbor_list.py::test_gpu_backends_match_cpu"}
# shellcheck disable=SC2086
step tests 200 $PY -m pytest -q -p no:cacheprovider -o addopts="" -v --tb=short -rfE \
  --junitxml="$OUT/tests.xml" -k "not fresh_process" $TESTS

step bench_train 240 $PY benchmarks/bench_edge_attention.py --device cuda --repeats 5 \
  --providers ${TRAIN_PROVIDERS:-reference factorized fused fused-dense reference+cuda_graph \
  factorized+cuda_graph fused+cuda_graph fused-dense+cuda_graph fused-dense+compile} \
  --out "$OUT/edge_attention_gpu.csv"

# shellcheck disable=SC2086
step bench_sampling 150 $PY benchmarks/bench_sampling.py --device cuda --steps 12 \
  ${SAMPLING_ARGS:-} --out "$OUT/sampling_gpu.csv"

step profile 90 $PY benchmarks/profile_train_step.py --sizes paper shipped --workloads mpts52 \
  --providers ${PROFILE_PROVIDERS:-reference factorized fused fused-dense} --out "$OUT/profile.txt"

step train_smoke 75 $PY -m dao.cli train configs/daog_mp20_small.toml -o /tmp/dao_gpu_run \
  --max-minutes 0.5 -q
cp /tmp/dao_gpu_run/log.csv "$OUT/logs/train_smoke_log.csv" 2>/dev/null

step bench_compile 150 $PY benchmarks/bench_edge_attention.py --device cuda --repeats 5 \
  --sizes paper --workloads mpts52 --providers reference+compile \
  --out "$OUT/edge_attention_gpu_compile.csv"
echo "== done in $(($(date +%s) - START)) s" | tee -a "$OUT/steps.log"
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
