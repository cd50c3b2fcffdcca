#!/usr/bin/env bash
# WMT14 EN-DE on a Cloud TPU VM pod slice: the same command on every worker, one process each.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b PROJECT=my-project \
#     WORKDIR=/mnt/shared/runs/wmt14_ende_base experiments/tpu_pod.sh
#   MODEL=big ... experiments/tpu_pod.sh
#   ... experiments/tpu_pod.sh --config.train.steps=1000     # extra flags go to train
#
# Run it from your workstation (it uses gcloud). It assumes the repository is checked out
# and installed (`pip install -e '.[tpu]'`) at $REMOTE_REPO on every worker (see SETUP below),
# and WORKDIR / TFDS_DATA_DIR on a file system that every worker mounts at the same path
# (Filestore/NFS, or a bucket mounted with gcsfuse): train.py writes the work directory with
# plain file operations, so gs:// paths do not work, and all workers write every checkpoint.
#
# Every worker runs the project's one training command:
#   python -m transformer.train --config=configs/wmt14_ende.py:base --workdir=$WORKDIR
# On a Cloud TPU VM the slice's layout is in the GCE metadata server, not in environment
# variables (TPU_WORKER_HOSTNAMES / TPU_WORKER_ID are set on GKE, not on TPU VMs made with
# `gcloud compute tpus tpu-vm create`). So each worker reads its id and worker 0's address
# from the metadata server and exports JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
# JAX_PROCESS_ID, which train.py passes to jax.distributed.initialize().
# Run it again to resume from the latest checkpoint.
set -euo pipefail

TPU_NAME="${TPU_NAME:?set TPU_NAME}"
ZONE="${ZONE:?set ZONE}"
PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null)}"
MODEL="${MODEL:-base}"                              # base | big
CONFIG="${CONFIG:-configs/wmt14_ende.py:${MODEL}}"
WORKDIR="${WORKDIR:?set WORKDIR to a directory on a file system every worker mounts}"
TFDS_DATA_DIR="${TFDS_DATA_DIR:-}"                  # shared too; '' = ~/tensorflow_datasets
REMOTE_REPO="${REMOTE_REPO:-~/transformer}"         # the checkout on every worker
REMOTE_PYTHON="${REMOTE_PYTHON:-python3}"
COORDINATOR_PORT="${COORDINATOR_PORT:-8482}"
SETUP="${SETUP:-0}"                                 # 1: clone/pull and install on every worker first
REPO_URL="${REPO_URL:-}"                            # for SETUP=1

q() { printf '%q ' "$@"; }                          # quote for the remote shell

args=(--config="${CONFIG}" --workdir="${WORKDIR}")
if [[ -n "${TFDS_DATA_DIR}" ]]; then args+=(--config.data.tfds_data_dir="${TFDS_DATA_DIR}"); fi
args+=("$@")

ssh_all() {
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --project="${PROJECT}" \
    --worker=all --command="$1"
}

if [[ "${SETUP}" == 1 ]]; then
  : "${REPO_URL:?set REPO_URL for SETUP=1}"
  ssh_all "set -e; if [ -d ${REMOTE_REPO} ]; then git -C ${REMOTE_REPO} pull --ff-only; \
else git clone $(q "${REPO_URL}") ${REMOTE_REPO}; fi; \
cd ${REMOTE_REPO} && ${REMOTE_PYTHON} -m pip install -q -e '.[tpu]'"
fi

# The dataset is prepared before train starts (a multi-process train refuses unprepared
# data): with a shared TFDS_DATA_DIR by worker 0 once; without one, by every worker into its
# own ~/tensorflow_datasets (each downloads it).
prep=$(q --config="${CONFIG}")
if [[ -n "${TFDS_DATA_DIR}" ]]; then
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --project="${PROJECT}" \
    --worker=0 --command="cd ${REMOTE_REPO} && ${REMOTE_PYTHON} -m transformer.prepare \
${prep} $(q --config.data.tfds_data_dir="${TFDS_DATA_DIR}")"
else
  ssh_all "cd ${REMOTE_REPO} && ${REMOTE_PYTHON} -m transformer.prepare ${prep}"
fi

# What each worker runs: its id and the coordinator from the metadata server, then train.
read -r -d '' REMOTE <<EOS || true
set -euo pipefail
md() { curl -sf -H 'Metadata-Flavor: Google' \
  "http://metadata.google.internal/computeMetadata/v1/instance/attributes/\$1"; }
endpoints=\$(md worker-network-endpoints)      # 'name:id:ip,...' (or 'host,...' on newer VMs)
first=\${endpoints%%,*}
export JAX_COORDINATOR_ADDRESS="\${first##*:}:${COORDINATOR_PORT}"
export JAX_NUM_PROCESSES=\$(echo "\${endpoints}" | tr ',' '\n' | grep -c .)
export JAX_PROCESS_ID=\$(md agent-worker-number)
cd ${REMOTE_REPO}
echo "worker \${JAX_PROCESS_ID}/\${JAX_NUM_PROCESSES}, coordinator \${JAX_COORDINATOR_ADDRESS}" >&2
exec ${REMOTE_PYTHON} -m transformer.train $(q "${args[@]}")
EOS

echo "$(date -u +%FT%TZ) ${TPU_NAME}: python -m transformer.train ${args[*]}" >&2
ssh_all "${REMOTE}"
