#!/usr/bin/env bash
# Creates (once) an isolated virtualenv with the official Yandex Cloud Python SDK, for the wire
# compatibility test (tests/compat/). Isolated because the SDK pins protobuf below 7 while this
# project needs 7. Re-created only when tests/compat/sdk-requirements.txt changes.
# Usage: scripts/sdk-venv.sh [VENV_DIR]   (default .local/sdk-venv); prints the venv's python.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$root/.local/sdk-venv}"
requirements="$root/tests/compat/sdk-requirements.txt"
python="${PYTHON:-python3}"
want="$(sha256sum "$requirements" | cut -d' ' -f1)"
stamp="$venv/.requirements.sha256"

if [[ ! -x "$venv/bin/python" || ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    rm -rf "$venv"
    "$python" -m venv "$venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements" >&2
    "$venv/bin/python" -c \
        'import yandex.cloud.serverless.apigateway.websocket.v1.connection_service_pb2_grpc' >&2
    echo "$want" >"$stamp"
fi
echo "$venv/bin/python"
