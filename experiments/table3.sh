#!/usr/bin/env bash
# Reproduces the paper's Table 3: trains the chosen rows (default: all 20) into RUNS_DIR/<row>,
# evaluates each on the validation split (newstest2013 for WMT14; beam search, no checkpoint
# averaging, as Table 3), and ends with the report beside the paper's figures.
#
#   experiments/table3.sh [ROW ...] [-- TRAIN_OVERRIDES ...]
#   CONFIG=configs/table3_mini.py RUNS_DIR=runs/mini experiments/table3.sh base A1 C5
#   SLURM=1 RUNS_DIR=/shared/runs/table3 experiments/table3.sh    # one array task per row
#
# Running it again skips the rows already evaluated and resumes unfinished ones (train resumes
# by itself from a row's newest checkpoint). Variables:
#   CONFIG     the config file whose argument is the row (configs/table3.py)
#   RUNS_DIR   where the rows' work directories go (runs/table3)
#   PYTHON     the interpreter of the project's environment (python)
#   SLURM=1    submit one SLURM array task per row with sbatch, and the report as a job that
#              runs after them; SBATCH_ARGS are passed to sbatch (partition, GPUs, time)
set -euo pipefail
# In a SLURM task the script runs from a copy: the submission directory is the checkout.
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"

CONFIG=${CONFIG:-configs/table3.py}
RUNS_DIR=${RUNS_DIR:-runs/table3}
PYTHON=${PYTHON:-python}
ALL_ROWS=(base A1 A2 A3 A4 B1 B2 C1 C2 C3 C4 C5 C6 C7 D1 D2 D3 D4 E big)

ROWS=()
EXTRA=()
while [[ $# -gt 0 ]]; do
  if [[ $1 == -- ]]; then shift; EXTRA=("$@"); break; fi
  ROWS+=("$1"); shift
done
[[ ${#ROWS[@]} -gt 0 ]] || ROWS=("${ALL_ROWS[@]}")

report() {
  "$PYTHON" -m transformer.report "$RUNS_DIR" --out="$RUNS_DIR/report.md" \
      --plot="$RUNS_DIR/report.png"
}

run_row() {
  local row=$1 workdir="$RUNS_DIR/$1"
  if compgen -G "$workdir/eval/validation_step*_beam*.json" > /dev/null; then
    echo "table3: $row is trained and evaluated; skipped" >&2
    return
  fi
  echo "table3: training $row in $workdir" >&2
  "$PYTHON" -m transformer.train --config="$CONFIG:$row" --workdir="$workdir" "${EXTRA[@]}"
  echo "table3: evaluating $row on the validation split" >&2
  "$PYTHON" -m transformer.evaluate --workdir="$workdir" --split=validation --average=1 \
      > /dev/null
}

mkdir -p "$RUNS_DIR"
if [[ -n ${SLURM_ARRAY_TASK_ID:-} && -n ${TABLE3_ROWS:-} ]]; then
  # One row of a submitted array (see below).
  read -r -a rows <<< "$TABLE3_ROWS"
  run_row "${rows[$SLURM_ARRAY_TASK_ID]}"
elif [[ ${SLURM:-0} == 1 ]]; then
  export CONFIG RUNS_DIR PYTHON TABLE3_ROWS="${ROWS[*]}"
  job=$(sbatch --parsable ${SBATCH_ARGS:-} --array=0-$((${#ROWS[@]} - 1)) \
        --job-name=table3 --output="$RUNS_DIR/slurm-%A_%a.out" "$0" -- "${EXTRA[@]}")
  sbatch ${SBATCH_ARGS:-} --dependency=afterany:"$job" --job-name=table3-report \
      --output="$RUNS_DIR/slurm-report-%j.out" \
      --wrap="cd $(pwd) && $PYTHON -m transformer.report $RUNS_DIR --out=$RUNS_DIR/report.md --plot=$RUNS_DIR/report.png"
  echo "table3: submitted array job $job (${#ROWS[@]} rows) and the report after it" >&2
else
  for row in "${ROWS[@]}"; do
    run_row "$row"
  done
  report
fi
