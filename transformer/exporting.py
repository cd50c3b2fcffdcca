"""Exporting a trained model to another inference library, as one model directory.

The parameters are exactly those `evaluate` decodes with (`saved_runs.load_model`: one
checkpoint, or the mean of the last K, the vocabulary's fingerprint checked). Targets:

* `ctranslate2` (`export_ctranslate2.py`): every configuration, weights in any of
  CTranslate2's types (int8 for fast CPU decoding); the SentencePiece model is copied beside it
  as `sentencepiece.model`.
* `huggingface` (`export_huggingface.py`): a `MarianMTModel` with `MarianTokenizer` files, for
  the configurations Marian can hold.

Bad input is refused in one line before anything is written. The model is written into a
temporary sibling of the output directory and renamed into place at the end, so the output
directory never holds a half-written model (nor does a failed or interrupted export leave the
temporary one behind).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import numpy as np
from flax import nnx

from transformer import errors, export_ctranslate2, export_huggingface, run_config, saved_runs
from transformer import vocabulary as vocabulary_lib
from transformer import workdir as workdir_lib
from transformer.errors import UsageError
from transformer.model import sinusoidal_table
from transformer.tokenizer import EOS_ID, PAD_ID, UNK_ID

TARGETS = ('ctranslate2', 'huggingface')
QUANTIZATIONS = {'ctranslate2': export_ctranslate2.QUANTIZATIONS,
                 'huggingface': export_huggingface.QUANTIZATIONS}
INFO_FILE = 'transformer_export.json'  # where the model came from, beside it
CT2_SENTENCEPIECE = 'sentencepiece.model'


def check_request(to: str, out: str | None, quantization: str | None, overwrite: bool) -> str:
    """Checks the target, the quantization and the output directory; returns the
    quantization (default float32: the model as trained, scores as `score` gives them)."""
    if to not in TARGETS:
        raise UsageError(f'--to={to} is not a target; choose one of {", ".join(TARGETS)}')
    quantization = quantization or 'float32'
    if quantization not in QUANTIZATIONS[to]:
        hint = ' (int8 and the other CTranslate2 types: --to=ctranslate2)' \
            if to == 'huggingface' and quantization in QUANTIZATIONS['ctranslate2'] else ''
        raise UsageError(f'--quantization={quantization} is not supported by --to={to}; it '
                         f'takes {", ".join(QUANTIZATIONS[to])}{hint}')
    if not out:
        raise UsageError('--out=DIR is required: the directory to write the model to')
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f'--out={out} is a file, not a directory')
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise UsageError(f'--out={out} exists and is not empty; give --overwrite to replace '
                         'it, or another --out')
    return quantization


def single_model(members: list) -> None:
    """An ensemble is refused: its members' probabilities are averaged at every step
    (search.py), which neither target computes from one set of weights."""
    if len({(os.path.realpath(m.workdir), m.step) for m in members}) > 1:
        raise UsageError(f'an ensemble of {len(members)} models is not exportable as one model '
                         '(each target decodes one set of weights); export each member, or '
                         'average checkpoints of one run with --average=K')


def vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], dict[str, str]]:
    """(the pieces in id order, padded with placeholders up to the model's vocab_size; the
    pad, eos and unk pieces)."""
    tokens = tokenizer.pieces(range(tokenizer.vocab_size))
    taken = set(tokens)
    for i in range(len(tokens), vocab_size):  # rows the SentencePiece model did not fill
        name = f'<unused{i}>'
        while name in taken:
            name = '<' + name + '>'
        tokens.append(name)
    pieces = dict(pad=tokens[PAD_ID], eos=tokens[EOS_ID], unk=tokens[UNK_ID])
    return tokens, pieces


def numpy_params(model) -> dict:
    """The model's parameters as float32 numpy arrays, nested as nnx.to_pure_dict gives them."""
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    # Copies: CTranslate2 quantizes in place, and arrays from JAX are read-only.
    return jax.tree.map(lambda a: np.array(jax.device_get(a), np.float32), state)


def position_table(params: dict, cfg) -> np.ndarray:
    """The positions added to the embeddings: section 3.5's sinusoid or the learned table."""
    if cfg.positional == 'learned':
        return params['position_embed']['embedding']
    return sinusoidal_table(cfg.max_position, cfg.d_model)


def write(model, config, tokenizer, vocab_model: str, directory: str, to: str,
          quantization: str) -> None:
    """Writes the model in the `to` format into the existing, empty `directory`."""
    params, cfg = numpy_params(model), config.model
    tokens, pieces = vocabulary(tokenizer, config.vocab_size)
    if to == 'ctranslate2':
        spec = export_ctranslate2.build_spec(params, cfg, tokens, position_table(params, cfg),
                                             pieces)
        export_ctranslate2.save(spec, directory, quantization)
        shutil.copyfile(vocab_model, os.path.join(directory, CT2_SENTENCEPIECE))
    else:
        export_huggingface.save(params, cfg, tokens, pieces, vocab_model, directory,
                                source_lang=config.source_lang, target_lang=config.target_lang,
                                dtype=quantization, beam_size=config.decode.beam_size,
                                alpha=config.decode.length_penalty)


def export(workdir: str, *, to: str, out: str, average: int | None = None,
           step: int | str | None = None, quantization: str | None = None,
           overwrite: bool = False, raw_weights: bool = False) -> dict:
    """Exports the model `evaluate --workdir=workdir [--average | --step]` would decode with
    to `out`; returns what was written (also stored in out/transformer_export.json)."""
    quantization = check_request(to, out, quantization, overwrite)
    config = run_config.load_config(workdir)
    if to == 'huggingface':
        why = export_huggingface.unsupported(config.model)
        if why:
            raise UsageError(f'--to=huggingface cannot hold this model: {why}; '
                             '--to=ctranslate2 holds every configuration')
    model, config, tokenizer, steps = saved_runs.load_model(
        workdir, average=average, step=step, raw_weights=raw_weights)
    vocab_model = workdir_lib.path(workdir, workdir_lib.VOCAB_MODEL)
    info = dict(
        target=to, quantization=quantization, workdir=os.path.abspath(workdir), steps=steps,
        checkpoints_averaged=len(steps), weights=saved_runs.weights(config, raw_weights),
        direction=f'{config.source_lang}->{config.target_lang}',
        vocab_sha256=vocabulary_lib.stored_fingerprint(workdir),
        vocab_size=int(config.vocab_size), model=config.model.to_dict(),
        # What the project's own search does (section 6.1); the targets' own length
        # penalties divide by length^alpha instead.
        search=dict(beam_size=config.decode.beam_size, alpha=config.decode.length_penalty,
                    length_penalty='((5 + length) / 6) ** alpha',
                    max_extra_length=config.decode.max_extra_length),
        start_symbol='PAD (id 0); never produced', source_ends_with='EOS (id 1)')

    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=f'.{os.path.basename(os.path.abspath(out))}.export-',
                                 dir=parent)
    try:
        write(model, config, tokenizer, vocab_model, temporary, to, quantization)
        with errors.written(os.path.join(temporary, INFO_FILE), 'the export\'s record') as f:
            f.write(json.dumps(info, indent=2).encode('utf-8'))
        _follow_umask(temporary)
        _replace(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    info['out'] = os.path.abspath(out)
    return info


def _follow_umask(directory: str) -> None:
    """mkdtemp makes the directory private (and safetensors its file): a model directory
    follows the umask, as the work directory's files do."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(directory, 0o777 & ~mask)
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o666 & ~mask)


def _replace(temporary: str, out: str) -> None:
    """Puts the finished directory at `out`, replacing an empty or overwritten one."""
    if not os.path.exists(out):
        os.rename(temporary, out)
        return
    old = tempfile.mkdtemp(prefix=f'.{os.path.basename(os.path.abspath(out))}.old-',
                           dir=os.path.dirname(os.path.abspath(out)))
    os.rmdir(old)
    os.rename(out, old)
    os.rename(temporary, out)
    shutil.rmtree(old, ignore_errors=True)
