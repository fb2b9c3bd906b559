#!/usr/bin/env bash
# Export the model into $LSTMSERVE_MODEL_DIR unless a finished export is already there.
#
# The one-shot `export` service of docker-compose.yml runs this, so a second `docker compose up`
# starts the server at once. A finished export is a directory with model.onnx in it; it only ever
# appears as a whole: the export writes into a private work directory beside the target, and the
# result is renamed into place after `lstmserve export` succeeded. A failed or interrupted export
# (non-zero exit, SIGTERM/SIGINT) removes its work directory and leaves the target as it was, so a
# later run never mistakes half an export for a finished one.
#
# Environment:
#   LSTMSERVE_MODEL_DIR      where the model goes (default /models/default)
#   LSTMSERVE_EXPORT_ARGS    extra `lstmserve export` options, whitespace-separated, e.g.
#                            "--preset tiny" or "--hidden-size 128 --steps 500" (not --out)
#   LSTMSERVE_EXPORT_FORCE   1: export again and replace the model that is there
#   LSTMSERVE_BIN            the lstmserve command (default: lstmserve from PATH)
set -euo pipefail

log() { printf 'export-if-missing: %s\n' "$*"; }

model_dir="${LSTMSERVE_MODEL_DIR:-/models/default}"
model_dir="${model_dir%/}"
export_args="${LSTMSERVE_EXPORT_ARGS:-}"
force="${LSTMSERVE_EXPORT_FORCE:-0}"
bin="${LSTMSERVE_BIN:-lstmserve}"

if [[ -z "$model_dir" ]]; then
  log "error: LSTMSERVE_MODEL_DIR is empty" >&2
  exit 2
fi

if [[ "$force" != "1" && -f "$model_dir/model.onnx" ]]; then
  log "model already exported: $model_dir/model.onnx (nothing to do; LSTMSERVE_EXPORT_FORCE=1 exports again)"
  exit 0
fi

# Split on whitespace only: no quoting, no glob expansion.
read -r -a args <<<"$export_args" || true
for arg in "${args[@]}"; do
  case "$arg" in
    --out | --out=*)
      log "error: LSTMSERVE_EXPORT_ARGS must not set --out (the output is LSTMSERVE_MODEL_DIR=$model_dir)" >&2
      exit 2
      ;;
  esac
done

parent="$(dirname -- "$model_dir")"
name="$(basename -- "$model_dir")"
mkdir -p -- "$parent"
# Work directories of earlier runs that were killed outright (SIGKILL, power loss): never a finished model.
rm -rf -- "$parent/.$name.export-"*
work="$parent/.$name.export-$$"
stage="$work/$name"
mkdir -- "$work"

child=""
cleanup() {
  if [[ -n "$child" ]]; then
    kill -TERM "$child" 2>/dev/null || true
    wait "$child" 2>/dev/null || true
    child=""
  fi
  rm -rf -- "$work"
}
trap 'cleanup' EXIT
trap 'log "interrupted: export abandoned, $model_dir left as it was" >&2; cleanup; exit 143' TERM
trap 'log "interrupted: export abandoned, $model_dir left as it was" >&2; cleanup; exit 130' INT

log "exporting into $model_dir: $bin export ${args[*]:-}"
# In the background so that a SIGTERM (docker compose stop) interrupts `wait` and reaches the trap.
"$bin" export --out "$stage" --no-progress ${args[@]+"${args[@]}"} &
child=$!
status=0
wait "$child" || status=$?
child=""
if [[ "$status" -ne 0 ]]; then
  log "error: lstmserve export failed (exit $status); $model_dir left as it was" >&2
  exit "$status"
fi
if [[ ! -f "$stage/model.onnx" ]]; then
  log "error: lstmserve export succeeded but wrote no model.onnx; $model_dir left as it was" >&2
  exit 1
fi
if [[ -e "$model_dir" ]]; then
  mv -- "$model_dir" "$work/previous"
fi
mv -- "$stage" "$model_dir"
log "exported: $model_dir/model.onnx"
