# Sourced by benchmarks/device_kernels.sh and benchmarks/device_e2e.sh (device tool, repo root).
# s24_bundle LOGFILE: install the carried vLLM 0.26.0 bundle (carry [".gpu_bundle"], made by
# ../shared/gpu/make_vllm_bundle.sh) and put it on PYTHONPATH/PATH; returns 1 when there is no bundle
# or its install failed (the log says why).
s24_bundle() {
  [ -d .gpu_bundle ] || { echo "no .gpu_bundle carried" >>"$1"; return 1; }
  bash .gpu_bundle/install_vllm_bundle.sh .gpu_bundle >>"$1" 2>&1 || return 1
  export PYTHONPATH=/tmp/vllm_site:$PWD:${PYTHONPATH:-} PATH=/tmp/vllm_site/bin:$PATH
  export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
}
