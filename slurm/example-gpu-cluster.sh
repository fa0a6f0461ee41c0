#!/usr/bin/env bash
# Example: a dehbws search on a real GPU cluster, from a login node.
#
# Read it, change the settings block to your site, then run the steps one by one (or the whole
# script). It assumes:
#   - a shared filesystem that login and compute nodes both see (SHARED below);
#   - compute nodes without internet access, hence the container and the prepared data;
#   - Apptainer on the compute nodes (`apptainer exec --nv` gives the tasks the host's GPU
#     driver) and dehbws installed on the login node, e.g. `pip install .` in a virtual
#     environment, because the coordinator calls sbatch and sacct, which live outside any image.
set -euo pipefail

# --- settings: change these --------------------------------------------------------------------
SHARED="${SHARED:-/shared/$USER/dehbws}"       # on the shared filesystem
IMAGE="$SHARED/dehbws.sif"                     # the Apptainer image of this repository
DATA_DIR="$SHARED/data"                        # the prepared Fashion-MNIST
RUN_DIR="$SHARED/runs/fmnist-$(date +%Y%m%d-%H%M%S)"
PRESET="${PRESET:-paper}"                      # `dehbws submit --help` lists the presets
GPU_PARTITION="${GPU_PARTITION:-gpu}"
ACCOUNT="${ACCOUNT:-}"                         # leave empty if your site needs none
QOS="${QOS:-}"
# -----------------------------------------------------------------------------------------------

log() { printf '[example] %s\n' "$*"; }

# 1. The image, built once. Where you cannot build (no root, no --fakeroot), build it elsewhere
#    and copy the .sif file over; a Docker image converts with
#    `apptainer build dehbws.sif docker-archive:dehbws.tar`.
build_image() {
  if [[ -f "$IMAGE" ]]; then
    log "image: $IMAGE exists"
    return
  fi
  mkdir -p "$(dirname "$IMAGE")"
  apptainer build "$IMAGE" apptainer.def
}

# 2. The dataset, prepared once on the shared filesystem by the image (which carries the raw
#    Fashion-MNIST files), so that no task downloads or decodes anything.
prepare_data() {
  mkdir -p "$DATA_DIR"
  apptainer exec "$IMAGE" dehbws data --out "$DATA_DIR"
}

# 3. The search. The coordinator runs as its own small CPU job (slurm/coordinator.sbatch) and
#    submits every rung as one array job: one GPU per task, at most --array-parallelism tasks
#    at a time, each task retried up to --max-retries times before it counts as failed.
#    --time-min must cover one subnet training at the highest rung's epochs.
submit_search() {
  local site_args=()
  [[ -n "$ACCOUNT" ]] && site_args+=(--account "$ACCOUNT")
  [[ -n "$QOS" ]] && site_args+=(--qos "$QOS")
  sbatch ${ACCOUNT:+--account="$ACCOUNT"} slurm/coordinator.sbatch \
    --preset "$PRESET" \
    --run-dir "$RUN_DIR" \
    --cache-dir "$DATA_DIR" \
    --partition "$GPU_PARTITION" \
    --gpus-per-task 1 \
    --cpus-per-task 4 \
    --mem-gb 16 \
    --time-min 90 \
    --array-parallelism 8 \
    --max-retries 2 \
    --container "$IMAGE" \
    "${site_args[@]}"
  # Site-specific sbatch flags pass through to the array jobs as KEY=VALUE, for example
  #   --sbatch-arg constraint=a100 --sbatch-arg exclude=node17
}

# 4. Watching and resuming.
explain_next_steps() {
  log "run folder: $RUN_DIR"
  log "watch:  squeue --me;  dehbws status $RUN_DIR;  tail -f $RUN_DIR/logs/coordinator.log"
  log "resume after a time limit or a cancelled coordinator:"
  log "        sbatch slurm/coordinator.sbatch --resume $RUN_DIR"
}

main() {
  cd "$(dirname "$0")/.."
  build_image
  prepare_data
  submit_search
  explain_next_steps
}

main "$@"
