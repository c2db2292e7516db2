#!/usr/bin/env bash
# Regenerate gen/ (the Go types of the topics' records) from the project's published schemas,
# proto/conntrack/{events,commands}/v1, with protoc-gen-go. The generated packages are placed in
# this module (M options) instead of under the schemas' own go_package.
#   GOBIN=.local/go/bin go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
#   examples/go-gateway/generate.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
module="$(awk '/^module /{print $2}' "$here/go.mod")"
plugin="$(command -v protoc-gen-go || echo "$repo/.local/go/bin/protoc-gen-go")"
include="$("$repo/.venv/bin/python" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')"
rm -rf "$here/gen" && mkdir -p "$here/gen"
"$repo/.venv/bin/python" -m grpc_tools.protoc -I"$repo/proto" -I"$include" \
  --plugin=protoc-gen-go="$plugin" --go_out="$here/gen" --go_opt=paths=source_relative \
  --go_opt=Mconntrack/events/v1/events.proto="$module/gen/conntrack/events/v1;eventsv1" \
  --go_opt=Mconntrack/commands/v1/commands.proto="$module/gen/conntrack/commands/v1;commandsv1" \
  conntrack/events/v1/events.proto conntrack/commands/v1/commands.proto
