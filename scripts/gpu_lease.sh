#!/usr/bin/env bash
# Meta-train for a fixed wall-clock budget on a leased machine and leave a pack that the
# next lease (or a CPU session) continues from.
#
#   scripts/gpu_lease.sh BUDGET_SECONDS OUT_DIR [RESUME_PACK] [-- MORE meta_train.py ARGS]
#
# 1. checks that jax, flax, optax, orbax and haiku import (haiku from a carried wheel:
#    LEASE_WHEELS=path/to/dm_haiku-*.whl or a directory of wheels);
# 2. unpacks RESUME_PACK (the OUT_DIR of a previous lease) and resumes its run;
# 3. runs `meta_train.py --config lease` (MORE ARGS come after and win: `--config
#    FILE`, `--set FIELD=VALUE`) with --stop-after (the budget left minus LEASE_MARGIN_S,
#    default 60 s, for the stop and the packing) and --compile-cache;
# 4. exports every new checkpoint's theta as an LO artifact (artifacts/step_N);
# 5. packs metrics, config, the light checkpoints and the artifacts (lease-run.tar.gz)
#    and the compile cache (lease-cache.tar.gz) into OUT_DIR: at most 8 files of at most
#    16 MiB each (larger archives are split into .partNN files; the cache is dropped
#    first when the files would be too many).
#
# Exit status: meta_train.py's (0: finished or stopped at the deadline; 130/143: a
# signal; 74: a write failed), 3 when a package is missing, 2 on bad arguments. The pack
# is written whatever meta_train.py's status was.
set -uo pipefail

started=$(date +%s)
usage="usage: $0 BUDGET_SECONDS OUT_DIR [RESUME_PACK] [-- MORE meta_train.py ARGS]"
if [[ $# -lt 2 ]]; then echo "$usage" >&2; exit 2; fi
budget=$1 out_dir=$2
shift 2
resume_pack=""
if [[ $# -gt 0 && $1 != "--" ]]; then resume_pack=$1; shift; fi
if [[ $# -gt 0 && $1 == "--" ]]; then shift; fi
extra=("$@")
if ! [[ $budget =~ ^[0-9]+$ ]]; then
  echo "gpu_lease.sh: BUDGET_SECONDS=$budget; expected whole seconds" >&2; exit 2
fi
if [[ -n $resume_pack && ! -e $resume_pack ]]; then
  echo "gpu_lease.sh: RESUME_PACK $resume_pack does not exist" >&2; exit 2
fi

repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python}
margin=${LEASE_MARGIN_S:-60}
max_bytes=$((16 * 1024 * 1024))
max_files=8
work=${LEASE_WORK:-$(mktemp -d)}
mkdir -p "$work" "$out_dir"
run=$work/run cache=$work/jax_cache artifacts=$work/artifacts

# 1. Packages.
missing() {  # the packages that do not import (one interpreter: jax loads once)
  "$python" - <<'PY' 2>/dev/null || echo "python"
import importlib
missing = []
for name in ("jax", "flax", "optax", "orbax.checkpoint", "haiku"):
  try:
    importlib.import_module(name)
  except Exception:  # pylint: disable=broad-except
    missing.append(name)
print(" ".join(missing))
PY
}
absent=$(missing)
if [[ -n $absent && -n ${LEASE_WHEELS:-} ]]; then
  if [[ -d $LEASE_WHEELS ]]; then
    "$python" -m pip install -q --no-deps "$LEASE_WHEELS"/*.whl >&2
  else
    "$python" -m pip install -q --no-deps "$LEASE_WHEELS" >&2
  fi
  absent=$(missing)
fi
if [[ -n $absent ]]; then
  echo "gpu_lease.sh: cannot import $absent (carry a wheel: LEASE_WHEELS=path.whl)" >&2
  exit 3
fi

# 2. The previous lease's pack.
unpack() {  # unpack NAME: OUT/NAME.tar.gz or its .partNN pieces, into $work
  local parts=("$resume_pack"/"$1".tar.gz "$resume_pack"/"$1".tar.gz.part*)
  local found=()
  for p in "${parts[@]}"; do [[ -f $p ]] && found+=("$p"); done
  [[ ${#found[@]} -eq 0 ]] && return 0
  cat "${found[@]}" | tar -xz -C "$work"
}
resume=()
if [[ -n $resume_pack ]]; then
  unpack lease-run && unpack lease-cache || {
    echo "gpu_lease.sh: cannot unpack $resume_pack" >&2; exit 2; }
  if ls "$run/checkpoints" 2>/dev/null | grep -qx '[0-9]*'; then resume=(--resume); fi
fi

# 3. Meta-train until the deadline.
left=$((budget - ($(date +%s) - started) - margin))
if [[ $left -lt 1 ]]; then
  echo "gpu_lease.sh: budget $budget s leaves nothing after the ${margin} s margin" >&2
  exit 2
fi
"$python" "$repo/meta_train.py" --config lease --out "$run" --stop-after "$left" \
  --compile-cache "$cache" --no-progress "${resume[@]}" "${extra[@]}" &
child=$!
trap 'kill -TERM $child 2>/dev/null' TERM INT
wait $child
status=$?
while kill -0 $child 2>/dev/null; do wait $child; status=$?; done  # a trapped signal
trap - TERM INT

# 4. Every checkpoint not yet exported.
new=()
for d in "$run"/checkpoints/*; do
  s=$(basename "$d")
  [[ $s =~ ^[0-9]+$ && ! -d $artifacts/step_$s ]] && new+=("$s")
done
if [[ ${#new[@]} -gt 0 ]]; then
  steps=$(IFS=,; echo "${new[*]}")
  "$python" "$repo/meta_train.py" --out "$run" --export "$steps" --export-to "$artifacts" \
    >/dev/null || { [[ $status -eq 0 ]] && status=1; }
fi

# 5. Pack.
pack() {  # pack NAME DIR...: $out_dir/NAME.tar.gz, split in parts above 16 MiB
  local name=$1
  shift
  rm -f "$out_dir/$name".tar.gz*
  tar -czf "$out_dir/$name.tar.gz" -C "$work" --exclude=run/.lock "$@" || return 1
  if [[ $(stat -c %s "$out_dir/$name.tar.gz") -gt $max_bytes ]]; then
    split -b "$max_bytes" -d -a 2 "$out_dir/$name.tar.gz" "$out_dir/$name.tar.gz.part" &&
      rm "$out_dir/$name.tar.gz"
  fi
}
contents=()
for p in run artifacts; do [[ -e $work/$p ]] && contents+=("$p"); done
if [[ ${#contents[@]} -gt 0 ]]; then pack lease-run "${contents[@]}"; fi
if [[ -d $cache ]]; then pack lease-cache jax_cache; fi
count=$(ls "$out_dir" | grep -c '^lease-')
if [[ $count -gt $max_files ]]; then
  rm -f "$out_dir"/lease-cache.tar.gz*
  echo "gpu_lease.sh: dropped the compile cache from the pack (more than $max_files files)" >&2
fi
if [[ $(ls "$out_dir" | grep -c '^lease-') -gt $max_files ]]; then
  echo "gpu_lease.sh: the run alone needs more than $max_files files of 16 MiB" >&2
  status=74
fi
newest=$(ls "$run/checkpoints" 2>/dev/null | grep -x '[0-9]*' | sort -n | tail -1)
echo "gpu_lease.sh: newest checkpoint ${newest:-none}; pack in $out_dir:" \
  "$(cd "$out_dir" && ls lease-* | tr '\n' ' ')(continue with: $0 BUDGET NEW_OUT $out_dir)"
exit "$status"
