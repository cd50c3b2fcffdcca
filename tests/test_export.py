"""python -m transformer.export: real exports of a small trained model, checked through the target
libraries alone (CTranslate2, Hugging Face Transformers) against the project's own forced
decoding (`score`) and greedy search (`translate --beam_size=1`); every configuration on
CTranslate2 from random models; the one-line refusals, with nothing left half-written."""

import json
import os
import shutil

import numpy as np
import pytest
from conftest import error_line, run_program, run_train, tiny_config

from transformer import data, exported, exporting, host_decode, saved_runs, search
from transformer import export_ctranslate2 as ect
from transformer import export_huggingface as ehf
from transformer.errors import UsageError
from transformer.model import create_model

TOLERANCE = 1e-4  # log-probability of a sentence, float32 (the bound)
# Marian's LayerNorm epsilon is fixed at 1e-5 (ours 1e-6); with its own, a sentence's
# log-probability moves by about 1e-5 per token.
MARIAN_EPSILON_TOLERANCE = 2e-3
INT8_BLEU = 5.0  # int8 against float32, greedy, on the tiny model's test split
INT8_PER_TOKEN = 0.05  # mean |log p| change per token with int8 weights


@pytest.fixture(scope='module')
def trained_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp('export-run')
    run_train(path)  # 12 steps, checkpoints 4, 8, 12: evaluate averages the last 3
    return path


@pytest.fixture(scope='module')
def reference(trained_dir):
    """What the project's own programs give: score's log-probabilities of the test pairs and
    translate --beam_size=1's hypotheses (the same Scorer and Translator, in process)."""
    model, config, tokenizer, steps = saved_runs.load_model(str(trained_dir))
    sources, targets = data.load_text(config, 'test')
    pairs = list(zip(sources, targets))
    scorer = host_decode.Scorer([model], config, tokenizer, 16)
    scores = [lp for lp, _ in scorer([(n, s, t) for n, (s, t) in enumerate(pairs, 1)])]
    translator = host_decode.Translator([model], config, tokenizer,
                                        host_decode.settings(config, beam_size=1), 16)
    greedy = [h[0].text if h else '' for h in translator(list(enumerate(sources, 1)))]
    return dict(config=config, pairs=pairs, sources=sources, targets=targets, scores=scores,
                greedy=greedy, steps=steps)


def _greedy_kwargs(config):
    return dict(beam_size=1, max_extra_length=config.decode.max_extra_length,
                max_position=config.model.max_position, batch_size=16, exact_bounds=True)


def test_ctranslate2_scores_and_greedy_translations_match(trained_dir, reference, tmp_path):
    out = tmp_path / 'ct2'
    info = exporting.export(str(trained_dir), to='ctranslate2', out=str(out))
    assert info['steps'] == reference['steps'] == [4, 8, 12]  # evaluate's averaging
    assert sorted(os.listdir(out)) == ['config.json', 'model.bin', 'sentencepiece.model',
                                       'shared_vocabulary.json', 'transformer_export.json']
    assert json.loads((out / 'transformer_export.json').read_text())['vocab_sha256'] == \
        info['vocab_sha256']
    translator, sp = exported.ct2_load(str(out))
    scores = exported.ct2_score(translator, sp, reference['pairs'])
    assert exported.logprob_gap(scores, reference['scores']) < TOLERANCE
    greedy = exported.ct2_translate(translator, sp, reference['sources'],
                                    **_greedy_kwargs(reference['config']))
    assert greedy == reference['greedy']


def test_ctranslate2_int8_from_the_command_line(trained_dir, reference, tmp_path):
    out = tmp_path / 'ct2-int8'
    proc = run_program('export', f'--workdir={trained_dir}', '--to=ctranslate2', f'--out={out}',
                       '--quantization=int8', '--average=2', text=True)
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed['quantization'] == 'int8' and printed['steps'] == [8, 12]
    # Against the float32 export of the same parameters.
    exporting.export(str(trained_dir), to='ctranslate2', out=str(tmp_path / 'f32'), average=2)
    int8, sp = exported.ct2_load(str(out))
    f32, _ = exported.ct2_load(str(tmp_path / 'f32'))
    pairs = reference['pairs']
    tokens = sum(len(sp.encode(t)) + 1 for _, t in pairs)
    gap = np.abs(np.subtract(exported.ct2_score(int8, sp, pairs),
                             exported.ct2_score(f32, sp, pairs))).sum() / tokens
    assert gap < INT8_PER_TOKEN
    kwargs = _greedy_kwargs(reference['config'])
    bleu = [exported.bleu_of(exported.ct2_translate(t, sp, reference['sources'], **kwargs),
                             reference['targets']) for t in (int8, f32)]
    assert abs(bleu[0] - bleu[1]) <= INT8_BLEU


def test_huggingface_scores_greedy_and_tokenizer_match(trained_dir, reference, tmp_path):
    import torch
    from transformers import MarianTokenizer

    out = tmp_path / 'hf'
    exporting.export(str(trained_dir), to='huggingface', out=str(out))
    for name in ('config.json', 'generation_config.json', 'model.safetensors', 'source.spm',
                 'target.spm', 'vocab.json', 'tokenizer_config.json'):
        assert (out / name).is_file(), name
    generation = json.loads((out / 'generation_config.json').read_text())
    assert generation['num_beams'] == 4 and generation['bad_words_ids'] == [[0]]
    model, sp = exported.hf_load(str(out))
    pairs = reference['pairs']
    stock = exported.hf_score(model, sp, pairs)
    assert exported.logprob_gap(stock, reference['scores']) < MARIAN_EPSILON_TOLERANCE
    for module in model.modules():  # with our epsilon the export is exact
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = reference['config'].model.layer_norm_epsilon
    assert exported.logprob_gap(exported.hf_score(model, sp, pairs),
                                reference['scores']) < TOLERANCE
    greedy = exported.hf_translate(model, sp, reference['sources'],
                                   **_greedy_kwargs(reference['config']))
    assert greedy == reference['greedy']
    # MarianTokenizer reads our vocabulary as SentencePiece does, and decodes back.
    tokenizer = MarianTokenizer.from_pretrained(str(out))
    batch = tokenizer(reference['sources'][:4], return_tensors='pt', padding=True)
    for text, ids in zip(reference['sources'], batch.input_ids.tolist()):
        assert [i for i in ids if i != 0] == sp.encode(text) + [1]
    generated = model.generate(**batch, num_beams=1, max_length=8)
    for row in generated.tolist():
        kept = [i for i in row if i > 1]
        assert tokenizer.decode(row, skip_special_tokens=True) == sp.decode(kept)


@pytest.mark.parametrize('change', [
    dict(norm='pre', positional='learned', share_embeddings=False),
    dict(d_k=4, d_v=8, attention_bias=True), dict(d_k=8, d_v=4), dict(d_k=4, d_v=4)])
def test_ctranslate2_holds_every_configuration(change, tmp_path):
    """Random models (rows A/B head widths, row E, pre-LN, biases, untied embeddings): CT2's
    score_batch equals the project's forced decoding."""
    config = tiny_config(vocab_size=40, **change)
    model = create_model(config, seed=3)
    params = exporting.numpy_params(model)
    rng = np.random.default_rng(0)
    params = _perturb(params, rng)  # biases and LayerNorms away from their initial 0 and 1
    _set_params(model, params)
    tokens = ['<pad>', '</s>', '<unk>'] + [f't{i}' for i in range(3, 40)]
    spec = ect.build_spec(params, config.model, tokens,
                          exporting.position_table(params, config.model),
                          dict(pad='<pad>', eos='</s>', unk='<unk>'))
    ect.save(spec, str(tmp_path), 'float32')
    import ctranslate2
    translator = ctranslate2.Translator(str(tmp_path), device='cpu')
    sources = [list(rng.integers(3, 40, n)) for n in (5, 9, 2)]
    targets = [list(rng.integers(3, 40, n)) for n in (4, 7, 11)]
    results = translator.score_batch([[tokens[i] for i in s] for s in sources],
                                     [[tokens[i] for i in t] for t in targets])
    ours = _forced(model, sources, targets)
    assert exported.logprob_gap([sum(r.log_probs) for r in results], ours) < TOLERANCE


def test_huggingface_permutation_is_exact_on_a_random_model():
    import torch
    from transformers import MarianMTModel

    config = tiny_config(vocab_size=40, attention_bias=True)
    model = create_model(config, seed=5)
    rng = np.random.default_rng(1)
    params = _perturb(exporting.numpy_params(model), rng)
    _set_params(model, params)
    marian = MarianMTModel(ehf.marian_config(config.model, 40)).eval()
    weights = {k: torch.from_numpy(np.array(v)) for k, v in
               ehf.state_dict(params, config.model).items()}
    marian.load_state_dict(weights, strict=False)
    for module in marian.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = config.model.layer_norm_epsilon
    sources = [list(rng.integers(3, 40, n)) for n in (6, 3)]
    targets = [list(rng.integers(3, 40, n)) for n in (5, 8)]
    ours = _forced(model, sources, targets)
    theirs = []
    for s, t in zip(sources, targets):
        x = torch.tensor([s + [1]])
        y = torch.tensor([t + [1]])
        with torch.no_grad():
            logits = marian(input_ids=x, decoder_input_ids=torch.cat(
                [torch.zeros((1, 1), dtype=torch.long), y[:, :-1]], 1)).logits
        theirs.append(float(torch.log_softmax(logits, -1).gather(-1, y[..., None]).sum()))
    assert exported.logprob_gap(theirs, ours) < TOLERANCE


def test_huggingface_refuses_what_marian_cannot_hold(trained_dir, tmp_path):
    for change, field in ((dict(d_k=4), 'model.d_k=4'), (dict(positional='learned'),
                                                         'model.positional=learned'),
                          (dict(norm='pre'), 'model.norm=pre')):
        assert field in ehf.unsupported(tiny_config(**change).model)
    assert ehf.unsupported(tiny_config().model) is None
    # Through export, before any checkpoint is read: a work directory whose config is pre-LN.
    workdir = tmp_path / 'pre'
    workdir.mkdir()
    config = json.loads((trained_dir / 'config.json').read_text())
    config['model']['norm'] = 'pre'
    (workdir / 'config.json').write_text(json.dumps(config))
    with pytest.raises(UsageError, match=r'model\.norm=pre.*--to=ctranslate2'):
        exporting.export(str(workdir), to='huggingface', out=str(tmp_path / 'out'))
    assert not (tmp_path / 'out').exists()


def test_refusals_leave_nothing_written(trained_dir, tmp_path, monkeypatch):
    out = tmp_path / 'out'
    cases = [
        (dict(to='huggingface', quantization='int8'), 'not supported by --to=huggingface'),
        (dict(to='ctranslate2', quantization='int4'), 'not supported by --to=ctranslate2'),
        (dict(to='onnx'), 'not a target'),
    ]
    for kwargs, message in cases:
        with pytest.raises(UsageError, match=message):
            exporting.export(str(trained_dir), out=str(out), **kwargs)
    # A work directory without checkpoints.
    empty = tmp_path / 'empty'
    empty.mkdir()
    for name in ('config.json', 'vocab.model', 'vocab.json'):
        shutil.copy(trained_dir / name, empty / name)
    with pytest.raises(UsageError, match='no checkpoint'):
        exporting.export(str(empty), to='ctranslate2', out=str(out))
    # An ensemble.
    with pytest.raises(UsageError, match='not exportable as one model'):
        exporting.single_model([saved_runs.Member(str(trained_dir), 4),
                                saved_runs.Member(str(trained_dir), 8)])
    exporting.single_model([saved_runs.Member(str(trained_dir), 4)] * 2)  # one model twice
    assert sorted(os.listdir(tmp_path)) == ['empty']
    # A failure while writing: no temporary directory left, OUT untouched.
    out.mkdir()
    (out / 'keep.txt').write_text('mine')

    def broken(*args, **kwargs):
        raise OSError('disk trouble')

    monkeypatch.setattr(exporting, 'write', broken)
    with pytest.raises(OSError):
        exporting.export(str(trained_dir), to='ctranslate2', out=str(out), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ['empty', 'out']
    assert os.listdir(out) == ['keep.txt']


def test_command_line_refuses_a_non_empty_out(trained_dir, tmp_path):
    out = tmp_path / 'taken'
    out.mkdir()
    (out / 'model.bin').write_text('someone else\'s')
    proc = run_program('export', f'--workdir={trained_dir}', '--to=ctranslate2',
                       f'--out={out}', check=False, text=True)
    assert proc.returncode == 2
    assert '--overwrite' in error_line(proc)
    assert os.listdir(out) == ['model.bin'] and sorted(os.listdir(tmp_path)) == ['taken']
    proc = run_program('export', f'--ensemble={trained_dir}:4,{trained_dir}:8',
                       '--to=ctranslate2', f'--out={tmp_path / "new"}', check=False, text=True)
    assert proc.returncode == 2 and 'not exportable as one model' in error_line(proc)


# -- helpers ----------------------------------------------------------------------------------


def _perturb(params, rng):
    def move(path, a):
        name = path[-1].key
        if name in ('bias', 'scale'):
            return (a + rng.normal(0, 0.1, a.shape)).astype(np.float32)
        return a
    import jax
    return jax.tree_util.tree_map_with_path(move, params)


def _set_params(model, params) -> None:
    from flax import nnx
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)


def _forced(model, sources, targets) -> list[float]:
    width = lambda rows: max(len(r) for r in rows) + 1
    x = np.zeros((len(sources), width(sources)), np.int32)
    y = np.zeros((len(targets), width(targets)), np.int32)
    for i, (s, t) in enumerate(zip(sources, targets)):
        x[i, :len(s) + 1] = s + [1]
        y[i, :len(t) + 1] = t + [1]
    log_probs, _ = search.forced(*search.split([model]), x, y)
    return [float(v) for v in np.asarray(log_probs)]
