#!/usr/bin/env bash
# Downloads and prepares (ArrayRecord) the TFDS dataset of a config, once, before a
# multi-process run, so that its processes do not all prepare it at the same time.
#
#   experiments/prepare_tfds.sh configs/wmt14_ende.py:base [TFDS_DATA_DIR] [MANUAL_DIR]
#
# Single-process runs need none of this: train.py prepares the data on first use.
set -euo pipefail
CONFIG="${1:?usage: prepare_tfds.sh CONFIG [TFDS_DATA_DIR] [MANUAL_DIR]}"
DATA_DIR="${2:-}"
MANUAL_DIR="${3:-}"
PYTHON="${PYTHON:-python}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON}" - "${CONFIG}" "${DATA_DIR}" "${MANUAL_DIR}" <<'PY'
import importlib.util
import sys

import tensorflow_datasets as tfds

path, _, arg = sys.argv[1].partition(':')
spec = importlib.util.spec_from_file_location('config', path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
data = module.get_config(arg or None).data
if data.source != 'tfds':
    print(f'{sys.argv[1]}: data.source is {data.source!r}, nothing to prepare', file=sys.stderr)
    sys.exit(0)
builder = tfds.builder(data.tfds_name, data_dir=sys.argv[2] or None)
builder.download_and_prepare(
    file_format='array_record',
    download_config=tfds.download.DownloadConfig(manual_dir=sys.argv[3] or None))
print(f'{data.tfds_name} ready in {builder.data_dir}', file=sys.stderr)
PY
