# Sourced by the run_gpu_session*.sh scripts: the versions line and `step`, which runs one named step
# of $STEPS (comma-separated) under a time limit, logs it to $OUT/<name>.log, prints its tail and
# records "name rc=... seconds" in the `summary` array.
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"
summary=()
step() {  # name, seconds, command...
  local name=$1 secs=$2; shift 2
  [[ ",$STEPS," == *",$name,"* ]] || return 0
  local t0=$SECONDS
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$name rc=$rc $((SECONDS - t0))s")
  echo "=== $name (rc=$rc, $((SECONDS - t0)) s)"; grep -v '^{' "$OUT/$name.log" | tr '\r' '\n' | tail -${TAIL:-14}
}
