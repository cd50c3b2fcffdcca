"""`python -m transformer.export --workdir=DIR [--average=K | --step=S] --to=ctranslate2|huggingface
--out=OUT [--quantization=TYPE] [--overwrite]`: the trained model as one directory that another
library loads and translates with.

* `--to=ctranslate2`: a CTranslate2 model (`ctranslate2.Translator(OUT)`), every configuration
  the project trains; `--quantization` is one of CTranslate2's weight types (float32, the
  default, float16, bfloat16, int8, int8_float32, int8_float16, int8_bfloat16, int16). The
  SentencePiece model is copied beside it as `sentencepiece.model`.
* `--to=huggingface`: a `MarianMTModel` directory (safetensors, config, generation config with
  the paper's beam 4, `MarianTokenizer` files of our vocabulary) that
  `MarianMTModel.from_pretrained(OUT)` and `MarianTokenizer.from_pretrained(OUT)` load offline
  (Transformers 5 has no translation pipeline: `generate`); `--quantization` float32
  (default), float16 or bfloat16. A config Marian cannot hold is
  refused naming the field.

The parameters are those `evaluate` decodes with (`--average`, `--step` (a number or `best`),
default the config's decode.average_last; of a run with train.ema_decay, its moving average
unless `--raw_weights`). Refused in one line, exit status 2, with nothing written: a work
directory without checkpoints, OUT not empty without `--overwrite`, an ensemble, a quantization
the target does not take. Prints a JSON line of what was written (also in
OUT/transformer_export.json).
"""

from __future__ import annotations

import json

from absl import flags

from transformer import cli, exporting
from transformer.errors import UsageError

_WORKDIR = cli.define_workdir_flag()
_AVERAGE = flags.DEFINE_integer(
    'average', None, 'Average the last K checkpoints (default: the config\'s '
    'decode.average_last, at most the checkpoints there), as evaluate does.')
_STEP = cli.define_step_flag('Export this checkpoint (no averaging)')
_RAW_WEIGHTS = cli.define_raw_weights_flag()
_TO = flags.DEFINE_string('to', None, f'Target library: {" or ".join(exporting.TARGETS)}.')
_OUT = flags.DEFINE_string('out', None, 'Directory to write the model to (new or empty).')
_QUANTIZATION = flags.DEFINE_string(
    'quantization', None, 'Weight type: CTranslate2\'s (float32, float16, bfloat16, int8, '
    'int8_float32, int8_float16, int8_bfloat16, int16) or, for huggingface, float32, float16, '
    'bfloat16. Default float32.')
_OVERWRITE = flags.DEFINE_boolean('overwrite', False, 'Replace a non-empty --out.')
_ENSEMBLE = cli.define_ensemble_flag()


def main():
    if _TO.value is None:
        raise UsageError(f'--to is required: {" or ".join(exporting.TARGETS)}')
    exporting.check_request(_TO.value, _OUT.value, _QUANTIZATION.value, _OVERWRITE.value)
    members, home = cli.models_to_load(_WORKDIR.value, _ENSEMBLE.value, _STEP.value)
    exporting.single_model(members)
    if home is None:
        raise UsageError('--workdir is required: the work directory of a training run')
    cli.say(f'Exporting {home} to {_TO.value} ({_QUANTIZATION.value or "float32"}) in '
            f'{_OUT.value}')
    info = exporting.export(home, to=_TO.value, out=_OUT.value, average=_AVERAGE.value,
                            step=members[0].step, quantization=_QUANTIZATION.value,
                            raw_weights=_RAW_WEIGHTS.value,
                            overwrite=_OVERWRITE.value)
    print(json.dumps({k: info[k] for k in ('out', 'target', 'quantization', 'steps',
                                           'direction', 'vocab_sha256')}))


if __name__ == '__main__':
    cli.run(main)
