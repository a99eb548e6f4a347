#!/usr/bin/env bash
# Create (once) and print the Python of a venv with the LiteLLM proxy, for bench.loadgen.
#
# litellm[proxy] pins versions that clash with the test extras, so it lives in a venv of
# its own, cached under ~/.cache/meterproxy/litellm-proxy-venv (METERPROXY_LITELLM_VENV
# overrides the place, LITELLM_VERSION the release). bench.loadgen looks there by default.
#
#   bench/litellm_venv.sh            # create if missing; prints the venv's python
#   bench/litellm_venv.sh --force    # recreate
set -euo pipefail

VENV="${METERPROXY_LITELLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/meterproxy/litellm-proxy-venv}"
# The release docs/performance.md measured earlier. Newer ones' [proxy] extra pins
# packages the index here lacks (1.110.x: litellm-proxy; 1.109.3: litellm-proxy-extras
# 0.4.113).
VERSION="${LITELLM_VERSION:-1.108.7}"
PY="${PYTHON:-python3}"

if [[ "${1:-}" == "--force" ]]; then
  rm -rf "$VENV"
fi
# .complete is written last, so an interrupted install is redone, not trusted.
if [[ -f "$VENV/.complete" && -x "$VENV/bin/python" ]]; then
  echo "$VENV/bin/python"
  exit 0
fi
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
"$VENV/bin/python" -m pip install --quiet "litellm[proxy]==$VERSION" >&2
"$VENV/bin/python" -c "import litellm.proxy.proxy_cli" >&2
echo "$VERSION" > "$VENV/.complete"
echo "$VENV/bin/python"
