"""End to end: train the demo (runlocal) in a temporary work directory, then evaluate,
average, translate and attention through their command lines, and the decoding helpers they
share in process."""

import io
import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
from conftest import error_line, load_config, run_program

from transformer import (
    alignment,
    batching,
    cli,
    data,
    errors,
    host_decode,
    run_config,
    saved_runs,
    synthetic,
)
from transformer import tokenizer as tokenizer_lib
from transformer import vocabulary as vocabulary_lib
from transformer.model import create_model


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp('demo')
    run_program('train', '--config=configs/demo.py:runlocal', f'--workdir={path}',
        '--config.train.steps=10', '--config.train.checkpoint_every_steps=5',
        '--config.train.eval_every_steps=100', '--config.train.log_every_steps=5')
    return path


def test_train_evaluates_with_a_greedy_bleu(workdir):
    # configs/demo.py's train.eval_bleu_sentences=64: the last evaluation's greedy BLEU.
    rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    last = [r for r in rows if 'eval/nll' in r][-1]
    assert last['step'] == 10 and 0 <= last['eval/greedy_bleu'] <= 100


def test_evaluate_writes_hypotheses_and_scores(workdir):
    # On 8 devices: the batch is split over them.
    proc = run_program('evaluate', f'--workdir={workdir}', '--average=2', '--beam_size=2',
                       devices=8)
    result = json.loads(proc.stdout)
    config = run_config.load_config(str(workdir))
    sources, _ = data.load_text(config, 'test')
    assert result['sentences'] == len(sources)
    assert result['steps'] == [5, 10] and result['checkpoints_averaged'] == 2
    for key in ('sacrebleu', 'sacrebleu_signature', 'tokenized_bleu', 'chrf',
                'sacrebleu_lowercase', 'decode_seconds', 'sentences_per_second',
                'tokens_per_second'):
        assert key in result
    assert 'tok:13a' in result['sacrebleu_signature']
    hyp = pathlib.Path(result['hypotheses_file'])
    assert hyp.name == 'test_step10_avg2_beam2_alpha0.6.hyp'
    assert hyp.read_text(encoding='utf-8').count('\n') == len(sources)
    stored = json.loads(hyp.with_suffix('.json').read_text())
    assert stored['sacrebleu'] == result['sacrebleu']
    assert result['devices'].endswith('8 cpu device(s)')


def test_average_writes_the_mean(workdir):
    proc = run_program('average', f'--workdir={workdir}', '--last=2')
    result = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert result['steps'] == [5, 10]
    assert os.path.isdir(result['averaged'])
    error = error_line(run_program('average', f'--workdir={workdir}', '--last=9', check=False))
    assert 'last 9' in error


def test_translate_lines_empty_lines_and_truncation(workdir):
    text = 'zofu kabemi\n\n   \ntolarin zepa kabemi\n' + 'zofu ' * 400 + '\nlast line'
    proc = run_program('translate', f'--workdir={workdir}', '--average=1', '--beam_size=2',
               stdin=text.encode())
    out = proc.stdout.decode('utf-8').split('\n')
    assert out[-1] == '' and len(out) - 1 == 6  # one line out per line in
    assert out[1] == '' and out[2] == ''
    assert 'line 5' in proc.stderr.decode() and 'truncated' in proc.stderr.decode()


def test_a_lowercasing_run_trains_scores_and_translates_lowercased(tmp_path):
    """data.lowercase end to end: the vocabulary lowercases what train and translate encode
    (capitals the synthetic task never has would otherwise be unknown pieces), and the
    in-training BLEU says it is lowercased."""
    proc = run_program('train', '--config=configs/demo.py:runlocal', f'--workdir={tmp_path}',
                       '--config.data.lowercase=True', '--config.train.steps=4',
                       '--config.train.eval_every_steps=4', '--config.train.eval_bleu_sentences=8',
                       '--config.train.log_every_steps=4', text=True)
    assert 'greedy lowercased BLEU on 8 validation sentences' in proc.stderr + proc.stdout
    assert json.loads((tmp_path / 'vocab.json').read_text())['lowercase'] is True
    out = run_program('translate', f'--workdir={tmp_path}', '--beam_size=2',
                      stdin=b'ZOFU Tolarin KABEMI\nzofu tolarin kabemi\n', text=False)
    first, second = out.stdout.decode('utf-8').splitlines()
    assert first == second == second.lower()


def test_translate_refuses_non_utf8_with_its_line_number(workdir):
    proc = run_program('translate', f'--workdir={workdir}', '--average=1',
               stdin=b'fine\nalso fine\nbad \xff\xfe byte\n', check=False)
    assert proc.returncode == errors.EXIT_BAD_INPUT
    assert 'line 3' in error_line(proc) and 'UTF-8' in error_line(proc)


def test_attention_plot(workdir, tmp_path):
    out = tmp_path / 'attention.png'
    proc = run_program('plot_attention', f'--workdir={workdir}', '--text=zofu kabemi tolarin',
               f'--out={out}', '--average=1', '--beam_size=1')
    assert out.stat().st_size > 10_000
    assert json.loads(proc.stdout.decode().strip().splitlines()[-1])['out'] == str(out)


def test_workdir_without_checkpoint_is_refused(workdir, tmp_path):
    empty = tmp_path / 'untrained'
    empty.mkdir()
    shutil.copy(workdir / 'config.json', empty / 'config.json')
    shutil.copy(workdir / 'vocab.model', empty / 'vocab.model')
    for module in ('evaluate', 'translate'):
        proc = run_program(module, f'--workdir={empty}', stdin=b'x\n', check=False)
        assert proc.returncode == errors.EXIT_BAD_INPUT, module
        assert 'checkpoint' in error_line(proc)
    proc = run_program('evaluate', f'--workdir={tmp_path / "missing"}', check=False)
    assert proc.returncode == errors.EXIT_BAD_INPUT and 'does not exist' in error_line(proc)


# -- in process: order is kept (a random model, whose outputs differ by sentence) ------------


def random_model(workdir):
    config = run_config.load_config(str(workdir))
    return create_model(config, seed=3), config, vocabulary_lib.load(str(workdir))


def test_translator_keeps_order_and_matches_one_by_one(workdir):
    model, config, tokenizer = random_model(workdir)
    settings = host_decode.Settings(beam_size=2, alpha=0.6, max_extra_length=4)
    translator = host_decode.Translator(model, config, tokenizer, settings, batch_sentences=4,
                                        devices=jax.devices()[:1])
    sources, _ = data.load_text(config, 'test')
    lines = [(i + 1, s) for i, s in enumerate(sources[:6])]
    lines.insert(2, (99, ''))

    def texts(hypotheses):
        return [h[0].text if h else '' for h in hypotheses]

    batched = texts(translator(lines))  # sorted by length, two batches, put back in order
    # The same sentences in another order and other batches give the same translations.
    reverse = texts(translator(lines[::-1]))[::-1]
    assert batched == reverse
    assert batched[2] == ''
    assert len(set(batched)) > 2, 'the random model translates everything alike'


def test_sampled_translations_do_not_depend_on_batches_or_order(workdir):
    model, config, tokenizer = random_model(workdir)
    settings = host_decode.Settings(sampling=True, num_samples=2, top_p=0.9, seed=7,
                                    max_extra_length=4)
    sources, _ = data.load_text(config, 'test')
    # Sentences of one length bucket: each batch size compiles one shape.
    width = {i: int(batching.bucket_length(len(tokenizer.encode(s)) + 1, config.data))
             for i, s in enumerate(sources)}
    common = max(set(width.values()), key=list(width.values()).count)
    lines = [(i + 1, sources[i]) for i in sorted(width) if width[i] == common][:4]
    assert len(lines) == 4
    got = []
    for batch, order in ((1, 1), (4, -1)):
        translator = host_decode.Translator(model, config, tokenizer, settings,
                                            batch_sentences=batch, devices=jax.devices()[:1])
        got.append([[h.text for h in hyps] for hyps in translator(lines[::order])][::order])
    assert got[0] == got[1]
    assert all(len(hyps) == 2 for hyps in got[0])
    assert any(a != b for a, b in got[0]), 'two samples of a line should differ sometimes'


def test_evaluate_translates_every_sentence_in_order(workdir):
    model, config, tokenizer = random_model(workdir)
    settings = host_decode.Settings(beam_size=2, alpha=0.6, max_extra_length=3)
    split = batching.encode_split(config, tokenizer, 'test')
    n = len(split)
    decoder = host_decode.make_decoder(model, config, settings, n, devices=jax.devices()[:1])
    hypotheses, stats = host_decode.translate_split(decoder, config, tokenizer, split, n)
    assert sorted(hypotheses) == list(range(n))
    assert stats['generated_tokens'] > 0 and len(set(hypotheses.values())) > 2
    # The longest sentence alone (the same compiled shape) gets the same translation.
    longest = max(range(n), key=lambda i: len(split.source_ids[i]))
    tokens = decoder(np.asarray([split.source_ids[longest]])).tokens
    assert hypotheses[longest] == tokenizer.decode(tokens[0, 0].tolist())
    assert len(decoder.shapes_compiled) == 1
    # A limited decode chooses its sentences first: the first 5, in one batch of them.
    decoder = host_decode.make_decoder(model, config, settings, n, devices=jax.devices()[:1])
    first, _ = host_decode.translate_split(decoder, config, tokenizer, split, n, limit=5)
    assert first == {i: hypotheses[i] for i in range(5)}
    assert decoder.batches == 1


# -- research decoding through the command line: n-best, ensembles, sampling, scoring --------


def parse_nbest(text: str) -> list[tuple[int, str, float, int, float]]:
    """Moses n-best lines: (index, hypothesis, log_prob, tokens, score)."""
    entries = []
    for line in text.splitlines():
        index, hypothesis, features, score = line.split(' ||| ')
        names = features.split()
        assert names[0] == 'log_prob=' and names[2] == 'tokens=', line
        entries.append((int(index), hypothesis, float(names[1]), int(names[3]), float(score)))
    return entries


def test_nbest_of_an_ensemble_of_one_model_twice_and_scores_of_the_beam(workdir, tmp_path):
    """translate --nbest through an ensemble of checkpoint 10 twice (which is checkpoint 10:
    test_decode), then score of its hypotheses with checkpoint 10 alone."""
    lines = ['zofu kabemi', '', 'tolarin zepa kabemi', 'kabemi']
    twice = run_program('translate', f'--ensemble={workdir}:10,{workdir}:10', '--beam_size=3',
                        '--nbest=3', '--max_extra_length=5',
                        stdin=('\n'.join(lines) + '\n').encode())
    assert 'ensemble of' in twice.stderr.decode()
    entries = parse_nbest(twice.stdout.decode())
    assert [e[0] for e in entries] == [0, 0, 0, 1, 2, 2, 2, 3, 3, 3]
    assert entries[3] == (1, '', 0.0, 0, 0.0)  # a blank line: one empty entry
    for i in (0, 2, 3):
        scores = [e[4] for e in entries if e[0] == i]
        assert scores == sorted(scores, reverse=True)
    for _, _, log_prob, tokens, score in entries:
        if tokens:
            assert abs(score - log_prob / ((5 + tokens) / 6) ** 0.6) < 1e-5
    # Forced decoding of the beam's own hypotheses gives the log-probabilities it reported,
    # wherever the text reads back as the same pieces: `score` re-tokenizes text, and a barely
    # trained model may emit a word-inner piece first ('ex' where the tokenizer reads '▁ex').
    # (test_decode checks the same on token ids, for every hypothesis.)
    scored = [e for e in entries if e[3]]
    source, target = tmp_path / 'src.txt', tmp_path / 'tgt.txt'
    source.write_text(''.join(lines[e[0]] + '\n' for e in scored), encoding='utf-8')
    target.write_text(''.join(e[1] + '\n' for e in scored), encoding='utf-8')
    proc = run_program('score', f'--workdir={workdir}', '--step=10', f'--source={source}',
                       f'--target={target}')
    rows = [line.split('\t') for line in proc.stdout.decode().splitlines()]
    assert len(rows) == len(scored)
    tokenizer = vocabulary_lib.load(str(workdir))
    pieces = [len(tokenizer.encode(e[1])) + 1 for e in scored]  # + EOS
    assert [int(row[1]) for row in rows] == pieces
    same_pieces = [(row, e) for row, e, n in zip(rows, scored, pieces) if n == e[3]]
    assert same_pieces
    for (log_prob, tokens, _), entry in same_pieces:
        assert abs(float(log_prob) - entry[2]) < 1e-3 and int(tokens) == entry[3]
    for log_prob, tokens, perplexity in rows:
        assert abs(float(perplexity) - np.exp(-float(log_prob) / int(tokens))) < 1e-3
    summary = json.loads(proc.stderr.decode().strip().splitlines()[-1])
    assert summary['sentences'] == len(scored)
    assert summary['tokens'] == sum(int(r[1]) for r in rows)
    assert abs(summary['perplexity'] - np.exp(-sum(float(r[0]) for r in rows)
                                              / summary['tokens'])) < 1e-3


def test_translate_sampling_writes_samples_with_scores(workdir):
    proc = run_program('translate', f'--workdir={workdir}', '--sampling', '--num_samples=3',
                       '--top_p=0.9', '--temperature=1.5', '--seed=4',
                       stdin=b'zofu kabemi\ntolarin zepa\n')
    entries = parse_nbest(proc.stdout.decode())
    assert [e[0] for e in entries] == [0, 0, 0, 1, 1, 1]
    assert all(e[3] > 0 and e[2] < 0 for e in entries)
    assert 'sampling 3 per line, temperature 1.5, top-p 0.9, seed 4' in proc.stderr.decode()


def test_evaluate_an_ensemble_of_checkpoints_on_a_limited_split(workdir):
    proc = run_program('evaluate', f'--ensemble={workdir}:5,{workdir}:10', '--limit=5',
                       '--beam_size=2')
    result = json.loads(proc.stdout)
    assert result['sentences'] == 5 and 'steps' not in result
    assert [m['steps'] for m in result['ensemble']] == [[5], [10]]
    name = pathlib.Path(result['hypotheses_file']).name
    assert name.startswith('test_ensemble2-') and name.endswith('_beam2_alpha0.6_first5.hyp')
    assert len(pathlib.Path(result['hypotheses_file']).read_text().splitlines()) == 5


def another_vocabulary(workdir, into):
    """A copy of the run in `into` that was trained, as far as every check can tell, with another
    vocabulary: a new vocab.model, its sha256 in vocab.json and in every checkpoint."""
    shutil.copytree(workdir, into, ignore=shutil.ignore_patterns('eval'))
    config = run_config.load_config(str(into))
    sources, targets = data.load_text(config, 'train')
    proto = tokenizer_lib.train(sources[:500] + targets[:500], 120)
    (into / 'vocab.model').write_bytes(proto)
    fingerprint = vocabulary_lib.stored_fingerprint(str(into))
    meta = json.loads((into / 'vocab.json').read_text())
    (into / 'vocab.json').write_text(json.dumps(dict(meta, sha256=fingerprint)))
    for file in into.glob('checkpoints/*/_CHECKPOINT_METADATA'):
        stored = json.loads(file.read_text())
        stored['custom_metadata']['vocab_sha256'] = fingerprint
        file.write_text(json.dumps(stored))
    return into


def test_bad_decoding_input_is_refused_in_one_line(workdir, tmp_path):
    other_vocabulary = another_vocabulary(workdir, tmp_path / 'other')
    turned = tmp_path / 'turned'
    shutil.copytree(workdir, turned, ignore=shutil.ignore_patterns('eval'))
    config = json.loads((turned / 'config.json').read_text())
    config['source_lang'], config['target_lang'] = config['target_lang'], config['source_lang']
    (turned / 'config.json').write_text(json.dumps(config))
    source, target, latin1 = tmp_path / 's.txt', tmp_path / 't.txt', tmp_path / 'l.txt'
    source.write_text('a\nb\nc\n')
    target.write_text('a\nb\n')
    latin1.write_bytes(b'a\nb\n\xe9t\xe9\n')
    cases = [
        ('translate', [f'--workdir={workdir}', '--nbest=5'],
         '--nbest=5 must be at most the beam size (4)'),
        ('translate', [f'--ensemble={workdir},{other_vocabulary}'], 'another vocabulary'),
        ('translate', [f'--ensemble={workdir},{turned}'], 'translates tgt->src'),
        ('score', [f'--workdir={workdir}', f'--source={source}', f'--target={target}'],
         'has 3 lines but --target'),
        ('score', [f'--workdir={workdir}', f'--source={latin1}', f'--target={latin1}'],
         'l.txt:3: line is not valid UTF-8'),
    ]
    for module, args, message in cases:
        proc = run_program(module, *args, stdin=b'zofu\n', check=False)
        assert proc.returncode == errors.EXIT_BAD_INPUT, (args, proc.stderr.decode()[-2000:])
        assert message in error_line(proc), (args, error_line(proc))


def test_flag_values_are_refused_naming_the_flag(workdir):
    config = run_config.load_config(str(workdir))
    for given, message in [
            (dict(nbest=5), '--nbest=5 must be at most the beam size (4)'),
            (dict(beam_size=2, nbest=3), '--nbest=3 must be at most the beam size (2)'),
            (dict(sampling=True, temperature=0.0), '--temperature=0.0 must be > 0'),
            (dict(sampling=True, temperature=-1.0), '--temperature=-1.0 must be > 0'),
            (dict(sampling=True, top_p=1.5), '--top_p=1.5 must be in (0, 1]'),
            (dict(sampling=True, top_p=0.0), '--top_p=0.0 must be in (0, 1]'),
            (dict(sampling=True, beam_size=4), '--beam_size=4 is for beam search'),
            (dict(temperature=0.5), '--temperature=0.5 applies to sampling only'),
            (dict(beam_size=0), '--beam_size=0 must be >= 1'),
            (dict(no_repeat_ngram_size=0), '--no_repeat_ngram_size=0 must be >= 1')]:
        with pytest.raises(errors.UsageError) as raised:
            cli.decoding_settings(config, **given)
        assert str(raised.value).startswith(message), (given, str(raised.value))
    with pytest.raises(errors.UsageError, match='is not one of the --ensemble members'):
        cli.models_to_load('/elsewhere', f'{workdir}:5,{workdir}:10', None)
    members, home = cli.models_to_load(None, f'{workdir}:5, {workdir}', None)
    assert members == [saved_runs.Member(str(workdir), 5), saved_runs.Member(str(workdir))]
    assert home == str(workdir)


# -- constraints and alignments: target prefixes, no repeated n-grams, --alignment -------------


def test_translate_with_prefixes_no_repeated_ngrams_and_alignments(workdir):
    """One run with every new output: source<TAB>prefix lines, an n-best list, no repeated
    bigrams, alignments. Each hypothesis starts with its line's prefix, and its alignment
    pairs name words of the source and of the hypothesis."""
    lines = ['zofu kabemi\tjewer', 'tolarin zepa kabemi', '', 'kabemi zofu\t']
    proc = run_program('translate', f'--workdir={workdir}', '--beam_size=2', '--nbest=2',
                       '--no_repeat_ngram_size=2', '--alignment', '--max_extra_length=6',
                       stdin=('\n'.join(lines) + '\n').encode())
    assert 'no repeated 2-grams' in proc.stderr.decode()
    assert 'alignments from decoder layer 0' in proc.stderr.decode()
    entries = [line.split(' ||| ') for line in proc.stdout.decode().splitlines()]
    assert [int(e[0]) for e in entries] == [0, 0, 1, 1, 2, 3, 3]
    assert entries[4] == ['2', '', '', 'log_prob= 0 tokens= 0', '0']
    for index, hypothesis, pairs, _, _ in entries:
        source, _, prefix = lines[int(index)].partition('\t')
        assert hypothesis.startswith(prefix)
        for i, j in alignment.parse_pairs(pairs):
            assert i < len(source.split()) and j < len(hypothesis.split()), (pairs, hypothesis)
    assert all(e[2] for e in entries if e[1])


def test_translator_prefixes_repeats_and_refusals(workdir, tmp_path):
    """In process, with a random model (which repeats itself): a prefix too long for the
    line's length bound is refused naming the line; no output repeats a bigram of pieces."""
    model, config, tokenizer = random_model(workdir)
    target = tmp_path / 't.txt'
    target.write_text('x\n\n')
    settings = host_decode.Settings(beam_size=2, max_extra_length=3, no_repeat_ngram_size=2)
    translator = host_decode.Translator(model, config, tokenizer, settings, batch_sentences=4,
                                        devices=jax.devices()[:1], alignment_layer=1)
    with pytest.raises(errors.UsageError, match=r'^line 7: the target prefix has \d+ tokens '
                       r'but at most \d+ fit'):
        translator([(7, 'zofu')], ['jewer ' * 10])
    sources, _ = data.load_text(config, 'test')
    for hyps, source in zip(translator([(i, s) for i, s in enumerate(sources[:4])]), sources):
        ids = tokenizer.encode(hyps[0].text)
        assert len(set(zip(ids, ids[1:]))) == len(ids) - 1, hyps[0].text
        assert all(i < len(source.split()) for i, _ in
                   alignment.parse_pairs(hyps[0].alignment))
    with pytest.raises(errors.UsageError, match='t.txt has 2 lines but stdin has 3'):
        list(cli.prefixed_chunks(io.BytesIO(b'a\nb\nc\n'), str(target), 2))
    chunks = list(cli.prefixed_chunks(io.BytesIO(b'a\nb\n'), str(target), 1))
    assert chunks == [([(1, 'a')], ['x']), ([(2, 'b')], [''])]
    with pytest.raises(ValueError, match='the model has 2 decoder layers'):
        alignment.resolve_layer(2, 2)
    assert alignment.resolve_layer(None, 6) == 4 and alignment.resolve_layer(-1, 2) == 1


def test_alignment_error_rate_and_the_demo_tasks_true_alignment():
    """AER by hand, and the synthetic task's true alignments: one source word per target
    word, with the reordering rules (adjectives after their noun, the verb last)."""
    sure = [{(0, 0), (1, 2), (2, 1)}]
    assert alignment.alignment_error_rate(sure, sure) == 0.0
    assert alignment.alignment_error_rate([{(0, 0)}], sure) == pytest.approx(1 - 2 / 4)
    assert alignment.diagonal(3, 3) == {(0, 0), (1, 1), (2, 2)}
    assert alignment.hard_alignment(np.array([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1]]),
                                    ['\u2581ab', 'c', '\u2581d'], ['\u2581x', '\u2581y']) == [
                                        (0, 0), (0, 1)]
    config = load_config('demo')
    sources, targets = synthetic.generate(config, 'test')
    truth = synthetic.alignments(config, 'test')
    assert len(truth) == len(sources)
    for source, target, pairs in zip(sources, targets, truth):
        words = len(source.split())
        assert len(target.split()) == words and len(pairs) == words
        assert sorted(i for i, _ in pairs) == sorted(j for _, j in pairs) == list(range(words))
        assert (1, words - 1) in pairs or (2, words - 1) in pairs  # the verb goes last
