#!/usr/bin/env bash
# ../shared/bench side by side (official, ours, official) on a lent GPU machine, which has no network.
#
#   bash bench/device_side_by_side.sh prepare   # here: builds .devbench/ (git-ignored via .git/info/exclude)
#   # then, through the device tool, carrying .devbench:
#   bash bench/device_side_by_side.sh run       # fp32 (the official's TF32), bf16, fp8, exact fp32; ~3 min on an H200
#   bash bench/device_side_by_side.sh compile   # eager vs torch.compile of our denoiser (bf16); ~5 min
#
# prepare copies ../shared/bench and applies shared_bench_cuda.patch (CUDA fixes of that harness: the official
# denoiser's sigma buffer and the stored reference outputs follow the device, random weights are drawn on the GPU
# (the CPU RNG needs minutes for 3.9 G parameters), per-case CUDA peaks, xformers' exact attention through SDPA on
# CUDA, BENCH_TF32=0 for exact fp32), copies the .py files of the two reference checkouts ($SUPIR_REF,
# $CODEFORMER_REF) and downloads, for the device's Python 3.12, the wheels its image lacks.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
D=$ROOT/.devbench
case "${1:-}" in
prepare)
  set -e
  : "${SUPIR_REF:?set SUPIR_REF to a Fanghua-Yu/SUPIR checkout}" "${CODEFORMER_REF:?set CODEFORMER_REF to a sczhou/CodeFormer checkout}"
  mkdir -p "$ROOT/.git/info"; grep -qx '/.devbench/' "$ROOT/.git/info/exclude" 2>/dev/null || echo /.devbench/ >> "$ROOT/.git/info/exclude"
  rm -rf "$D/bench" "$D/ref"; mkdir -p "$D/ref" "$D/whl"
  cp -r "$ROOT/../shared/bench" "$D/bench"; chmod -R u+w "$D/bench"
  (cd "$D/bench" && patch -s -p1 < "$ROOT/bench/shared_bench_cuda.patch")
  for src in "$SUPIR_REF:Fanghua-Yu+SUPIR" "$CODEFORMER_REF:sczhou+CodeFormer"; do
    (cd "${src%%:*}" && find . -path ./.git -prune -o \( -name '*.py' -o -name '*.yaml' \) \
      -exec install -D -m644 {} "$D/ref/${src##*:}/{}" \;)
  done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$D/whl" \
    omegaconf==2.3.0 open_clip_torch ftfy wcwidth kornia kornia_rs diffusers importlib_metadata
  python3 -m pip wheel -q --no-deps -w "$D/whl" antlr4-python3-runtime==4.9.3
  du -sh "$D" ;;
run|compile)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$D"/whl/*.whl || exit 3
  mkdir -p /tmp/pk && ln -sfn "$ROOT" /tmp/pk/photo_restoration
  export PYTHONPATH=/tmp/site:/tmp/pk PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 BENCH_GEN_DEVICE=cuda
  export SUPIR_REF=$D/ref/Fanghua-Yu+SUPIR CODEFORMER_REF=$D/ref/sczhou+CodeFormer
  OUT=${OUT:-/tmp/devbench-out}; mkdir -p "$OUT"; L=$OUT/log.txt; J=$OUT/side.jsonl
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$L"
  if [ "$1" = compile ]; then timeout 290 python3 "$ROOT/bench/device_compile.py" 2>&1 | tee -a "$L"; exit; fi
  cd "$D/bench"
  step() { local t=$1; shift; echo "=== $* $(date +%T)" | tee -a "$L"
           timeout "$t" python3 bench.py "$@" --device cuda --threads 16 --json "$J" 2>&1 | grep -v Warning | tee -a "$L"; }
  O3() { echo --impl official --impl "project_impl:$1" --impl official; }
  step 60  codeformer $(O3 build_codeformer) --batch 1 4 --runs 5 --warmup 2
  step 90  supir-vae $(O3 build_supir_vae) --size 512 1024 --runs 3 --warmup 1
  step 150 supir-denoiser $(O3 build_supir_denoiser) --latent 64 128 --runs 5 --warmup 2
  step 120 supir-denoiser $(O3 build_supir_denoiser) --latent 64 128 --runs 5 --warmup 2 --dtype bf16
  BENCH_TF32=0 step 50 codeformer $(O3 build_codeformer) --batch 1 4 --runs 5 --warmup 2
  PROJECT_DTYPE=fp8 step 90 supir-denoiser --impl official --impl project_impl:build_supir_denoiser --latent 128 \
    --runs 5 --warmup 2 --dtype bf16
  step 50  supir-vae $(O3 build_supir_vae) --size 1024 --runs 3 --warmup 1 --dtype bf16
  BENCH_TF32=0 step 60 supir-vae $(O3 build_supir_vae) --size 1024 --runs 3 --warmup 1
  BENCH_TF32=0 step 120 supir-denoiser $(O3 build_supir_denoiser) --latent 128 --runs 5 --warmup 2
  echo "=== done $(date +%T)" | tee -a "$L" ;;
*) sed -n 2,14p "$0"; exit 2 ;;
esac
