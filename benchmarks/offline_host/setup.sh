# Sourced by the scripts beside it, from the repository root, on a GPU host without network access.
#   gpu_host_setup LOGFILE
# 1. vLLM: if VLLM_PARTS_DIR (default .gpu_bundle) holds a packed vLLM install with its
#    install_vllm_bundle.sh, install it under /tmp/vllm_site and put it on PYTHONPATH/PATH; if vLLM is
#    already importable, use that. 2. The plugin: `pip install -e .` without network (vLLM finds it
#    through its vllm.general_plugins entry point in every process), or a hand-written dist-info.
# 3. Wheels in WHEELS_DIR (default .whl), if any, go to /tmp/extra_site (after everything else).
# Returns 1 when vLLM cannot be imported.
gpu_host_setup() {
  local log=$1 parts=${VLLM_PARTS_DIR:-.gpu_bundle} wheels=${WHEELS_DIR:-.whl}
  export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
  export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  if [ -f "$parts/install_vllm_bundle.sh" ]; then
    bash "$parts/install_vllm_bundle.sh" "$parts" >>"$log" 2>&1 || { echo "vLLM install from $parts failed" | tee -a "$log"; return 1; }
    export PYTHONPATH=/tmp/vllm_site:$PWD:${PYTHONPATH:-} PATH=/tmp/vllm_site/bin:$PATH
  else
    export PYTHONPATH=$PWD:${PYTHONPATH:-}
  fi
  if ls "$wheels"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/extra_site \
      "$wheels"/*.whl >>"$log" 2>&1 && export PYTHONPATH=$PYTHONPATH:/tmp/extra_site
  fi
  if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >>"$log" 2>&1; then
    local d=/tmp/plugin_meta/vllm_sparse24-0.0.dist-info
    mkdir -p "$d"
    printf 'Metadata-Version: 2.1\nName: vllm-sparse24\nVersion: 0.0\n' >"$d/METADATA"
    printf '[vllm.general_plugins]\nsparse24 = vllm_sparse24:register\n' >"$d/entry_points.txt"
    export PYTHONPATH=/tmp/plugin_meta:$PYTHONPATH
    echo "plugin: pip install -e . failed, entry point written by hand" | tee -a "$log"
  fi
  python3 - <<'PY' 2>&1 | tee -a "$log"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name())
try:
    import vllm
    from importlib.metadata import entry_points
    eps = [e.value for e in entry_points(group="vllm.general_plugins")]
    print("vllm", vllm.__version__, "plugin entry points", eps)
except Exception as e:
    print("vllm not importable:", type(e).__name__, e)
from vllm_sparse24.kernels.cuda import lib
print("sparse24 library", lib.library_path(), len(lib.config_ids()), "configs")
PY
  python3 -c "import vllm" 2>/dev/null
}
