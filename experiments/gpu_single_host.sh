#!/usr/bin/env bash
# WMT14 EN-DE on one host with all its GPUs: one process that sees every GPU.
#
#   experiments/gpu_single_host.sh                       # base model, runs/wmt14_ende_base
#   MODEL=big WORKDIR=/data/runs/big experiments/gpu_single_host.sh
#   GRAD_ACCUM=2 experiments/gpu_single_host.sh          # same 25000-token batch, half the memory
#   experiments/gpu_single_host.sh --config.train.steps=1000   # extra flags go to train
#
# The command is the project's one training command; nothing here is GPU-specific:
#   python -m transformer.train --config=configs/wmt14_ende.py:base --workdir=$WORKDIR
# - One process drives all local GPUs; the mesh ('data' axis) spans them, each GPU gets
#   1/n of the rows of every global batch. No jax.distributed.initialize() is needed.
# - model.dtype 'auto' computes in bfloat16 on GPUs with float32 parameters and Adam state.
# - The global batch is data.batch_tokens (25000) source + target tokens per step whatever
#   the GPU count, so fewer GPUs train the same model, only slower. If a GPU runs out of
#   memory, GRAD_ACCUM=k (--config.train.grad_accum_steps=k) splits every batch into k
#   micro-batches run one after another: same batch and gradient, about 1/k the activations.
#   It is part of the stored config, so pick it before the first step (resume refuses a change).
# - Run it again to resume from the latest checkpoint in $WORKDIR.
set -euo pipefail

MODEL="${MODEL:-base}"                              # base | big
CONFIG="${CONFIG:-configs/wmt14_ende.py:${MODEL}}"  # or configs/wmt14_enfr.py:big, ...
WORKDIR="${WORKDIR:-runs/wmt14_ende_${MODEL}}"         # relative paths: from the repository root
TFDS_DATA_DIR="${TFDS_DATA_DIR:-}"                  # '' = ~/tensorflow_datasets
MANUAL_DIR="${MANUAL_DIR:-}"                        # archives downloaded by hand, if any
GRAD_ACCUM="${GRAD_ACCUM:-1}"
PYTHON="${PYTHON:-python}"

cd "$(dirname "${BASH_SOURCE[0]}")/.."

args=(--config="${CONFIG}" --workdir="${WORKDIR}")
if [[ -n "${TFDS_DATA_DIR}" ]]; then args+=(--config.data.tfds_data_dir="${TFDS_DATA_DIR}"); fi
if [[ -n "${MANUAL_DIR}" ]]; then args+=(--config.data.manual_dir="${MANUAL_DIR}"); fi
if [[ "${GRAD_ACCUM}" != 1 ]]; then args+=(--config.train.grad_accum_steps="${GRAD_ACCUM}"); fi

echo "$(date -u +%FT%TZ) $(hostname): ${PYTHON} -m transformer.train ${args[*]} $*" >&2
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader >&2 || true
fi
exec "${PYTHON}" -m transformer.train "${args[@]}" "$@"
