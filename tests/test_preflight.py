"""`python -m transformer.preflight`: the real step compiled for a TPU slice without one, and
what the plan says of it. The only test file that loads libtpu (one process at a time)."""

import json
import subprocess
import sys

import pytest
from conftest import error_line, program_env, run_program

from transformer import config as config_lib
from transformer import plan, targets
from transformer.errors import UsageError
from transformer.model_stats import summarize
from transformer.preflight import format_plan

GIB = 1024 ** 3


@pytest.fixture(scope='module')
def tpu_plan():
    """A tiny base model planned on tpu:v5e:2x4 (8 v5e chips) with 2 x 4 data x fsdp."""
    r = run_program('preflight', '--config=configs/wmt14_ende.py:base,runlocal',
                    '--target=tpu:v5e:2x4', '--config.train.mesh_fsdp=4', '--json', text=True,
                    timeout=600)
    return json.loads(r.stdout)


def test_a_tpu_slice_is_planned_through_the_command_line(tpu_plan):
    p = tpu_plan
    assert (p['platform'], p['device_kind'], p['devices']) == ('tpu', 'TPU v5 lite', 8)
    assert p['mesh'] == {'data': 2, 'fsdp': 4}
    # 'auto' settings follow the target's devices, not this CPU host's.
    assert p['settings'] == {'dtype': 'bfloat16', 'attention_impl': 'xla',
                             'scan_layers': False, 'remat': 'none'}
    t = p['train_step']
    mem = t['per_device_bytes']
    analysis = t['memory_analysis']
    assert analysis['total'] == analysis['peak'] + analysis['generated_code'] == mem['total']
    assert mem['xla_peak'] == analysis['argument'] + analysis['output'] - analysis['alias'] \
        + analysis['temp']
    assert 0 < mem['parameters'] < mem['total'] and mem['generated_code'] > 0
    assert t['chip_memory_bytes'] == 16 * GIB and t['fits'] is True
    # Parameters split 4 ways (fsdp) along d_model: a device holds a quarter of each matrix
    # (the feed-forward biases, without a d_model axis, whole).
    full = summarize(config_lib.load_file('configs/wmt14_ende.py:base,runlocal'))
    full = full['memory_bytes']['parameters']
    assert full / 4 <= mem['parameters'] < full / 3
    # Gradients: summed in float32 (all-reduce over data, reduce-scatter over fsdp); weights
    # gathered in bfloat16; no 16-bit sum, and the batch itself never travels.
    c = t['collectives']
    assert set(c['reduce-scatter']['bytes_by_dtype']) == {'f32'}
    assert set(c['all-gather']['bytes_by_dtype']) == {'bf16'}
    assert 'bf16' not in c['all-reduce']['bytes_by_dtype']
    assert c['all-reduce']['bytes_by_dtype'].get('s32', 0) < 64  # a scalar count, no rows
    assert p['batch'] == {'rows': 16, 'length': 64, 'tokens_per_side': 1024,
                          'ratio_to_batch_tokens': 1.0, 'grad_accum_steps': 1}
    assert t['flops'] > 0 and t['xla_flops'] > t['flops'] / 2  # unrolled: XLA counts all
    assert p['step_seconds']['mfu_30'] == pytest.approx(t['flops'] / (8 * 197e12 * 0.3))
    s = p['beam_search']
    assert (s['sentences'], s['source_length'], s['beam_size']) == (16, 64, 4)
    assert s['fits'] is True and s['memory_analysis']['total'] > 0


def test_the_printed_plan_names_every_figure(tpu_plan):
    text = format_plan(tpu_plan)
    for needle in ('tpu:v5e:2x4: 8 x TPU v5 lite', 'parameters', 'optimizer state',
                   'activations and temporaries', 'generated code', "XLA's peak",
                   'of 16.00 GiB: fits', 'reduce-scatter', 'all-gather', 'FLOPs',
                   'at 30 % MFU', 'beam search (beam 4'):
        assert needle in text, (needle, text)


def test_bad_targets_and_meshes_are_one_line():
    r = run_program('preflight', '--config=configs/demo.py:runlocal', '--target=tpu:v9:2x4',
                    check=False, text=True)
    assert r.returncode == 2
    assert error_line(r).startswith('error: --target=tpu:v9:2x4: want tpu:GEN:TOPOLOGY')
    r = run_program('preflight', '--config=configs/demo.py:runlocal', '--target=tpu:v5e:2x4',
                    '--config.train.mesh_fsdp=3', check=False, text=True)
    assert r.returncode == 2
    assert error_line(r) == ('error: train.mesh_fsdp=3 does not divide the 8 devices of '
                             '--target=tpu:v5e:2x4')


def test_a_missing_libtpu_or_cuda_plugin_names_the_install(tmp_path):
    # A libtpu that cannot be imported, as on a machine without the tpu extra.
    (tmp_path / 'libtpu').mkdir()
    (tmp_path / 'libtpu' / '__init__.py').write_text('raise ImportError("not here")\n')
    env = program_env(PYTHONPATH=f'{tmp_path}:{program_env()["PYTHONPATH"]}')
    env.pop('TPU_LIBRARY_PATH', None)
    r = run_program('preflight', '--config=configs/demo.py:runlocal', '--target=tpu:v5e:2x4',
                    env=env, check=False, text=True)
    assert r.returncode == 2
    assert "needs libtpu to compile for TPUs (no TPU needed): pip install -e '.[tpu]'" \
        in error_line(r)
    r = run_program('preflight', '--config=configs/demo.py:runlocal', '--target=gpu:h100x8',
                    check=False, text=True)
    assert r.returncode == 2
    assert "needs the CUDA plugin to compile for GPUs (no GPU needed; several GB): pip " \
        "install -e '.[cuda]'" in error_line(r)


def test_target_names():
    t = targets.parse('tpu:v5e:16x16')
    assert (t.platform, t.chips, t.chip.memory_bytes, t.topology) == (
        'tpu', 256, 16 * GIB, 'v5e:16x16')
    assert targets.parse('gpu:h100x8')[1:3] == ('gpu', 8)
    assert targets.parse('gpu:a100').chips == 1 and targets.parse('cpu:4').chips == 4
    for bad in ('tpu:v5e', 'tpu:v5e:2y4', 'gpu:h100x9', 'gpu:v100', 'cpu:0', 'fpga:1'):
        with pytest.raises(UsageError, match=f'--target={bad}: .*; e.g. tpu:v5e:2x4'):
            targets.parse(bad)
    text = targets.gpu_target_config('h100')
    assert 'core_count: 132' in text and 'major: 9' in text


def test_every_tpu_generation_has_one_device_per_chip():
    # libtpu describes a v4 slice with a device per TensorCore unless asked for megacore.
    code = ('from transformer import targets\n'
            'for name in ("tpu:v4:2x2x2", "tpu:v5p:2x2x2", "tpu:v5e:2x4", "tpu:v6e:2x4"):\n'
            '    t = targets.parse(name); targets.prepare_host(t)\n'
            '    print(name, len(targets.devices(t)), targets.devices(t)[0].device_kind)\n')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          env=program_env(), timeout=300, check=True)
    assert proc.stdout.splitlines() == [
        'tpu:v4:2x2x2 8 TPU v4', 'tpu:v5p:2x2x2 8 TPU v5', 'tpu:v5e:2x4 8 TPU v5 lite',
        'tpu:v6e:2x4 8 TPU v6 lite']


def test_the_batch_of_a_pod_grows_and_is_said():
    c = config_lib.load_file('configs/wmt14_ende.py:base')
    # The paper's 25,000 tokens in rows of the 256-token bucket: 97 rows, as many as fit.
    assert plan.largest_batch(c, 1)['rows'] == 97
    assert plan.largest_batch(c, 8)['rows'] == 96 and plan.batch_warning(c, 8) is None
    # 256 chips: a row each, 65,536 tokens a side.
    b = plan.largest_batch(c, 256)
    assert (b['rows'], b['tokens_per_side'], b['ratio_to_batch_tokens']) == (256, 65536, 2.621)
    warning = plan.batch_warning(c, 256)
    assert warning.startswith('the batches of the 256-token bucket hold 256 rows = 65,536 '
                              'tokens a side, 2.621x data.batch_tokens=25,000')
    assert 'device counts that keep it within 10%: [1, 2, 4, 8, 16, 32]' in warning
    assert plan.largest_batch(c, 64)['ratio_to_batch_tokens'] == 0.655  # 64 rows: fewer


HLO = '''HloModule m, entry_computation_layout={()->f32[8]{0}}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ar = bf16[4,2]{1,0} all-reduce(%x), replica_groups={}, to_apply=%add
  %ags = (f32[2]{0}, f32[8]{0}) all-gather-start(%x), dimensions={0}
  %agd = f32[8]{0} all-gather-done(%ags)
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %agd)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %c = s32[] constant(6)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

ENTRY %main () -> f32[8] {
  %w = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body
  %rs = f32[2]{0} reduce-scatter(%y), dimensions={0}, to_apply=%add
  ROOT %r = f32[8]{0} get-tuple-element(%w), index=1
}
'''


def test_collectives_count_each_run_of_a_loop_body():
    c = plan.collectives(HLO)
    assert c['all-reduce'] == {'count': 6, 'bytes': 6 * 16, 'bytes_by_dtype': {'bf16': 96},
                               'largest': ['bf16[4,2]']}
    assert c['all-gather']['count'] == 6 and c['all-gather']['bytes'] == 6 * 32  # -done only
    assert c['reduce-scatter']['count'] == 1 and c['reduce-scatter']['bytes'] == 8
    assert 'collective-permute' not in c


def test_auto_settings_follow_the_platform_of_the_devices():
    from transformer.model import resolved
    c = config_lib.load_file('configs/wmt14_ende.py:base')
    got = {p: {k: resolved(c, p).model[k] for k in ('dtype', 'attention_impl', 'scan_layers')}
           for p in ('cpu', 'gpu', 'tpu')}
    assert got == {'cpu': {'dtype': 'float32', 'attention_impl': 'xla', 'scan_layers': True},
                   'gpu': {'dtype': 'bfloat16', 'attention_impl': 'cudnn', 'scan_layers': False},
                   'tpu': {'dtype': 'bfloat16', 'attention_impl': 'xla', 'scan_layers': False}}
    c.model.update(dtype='float32', attention_impl='explicit', scan_layers='True')
    assert {k: resolved(c, 'tpu').model[k] for k in ('dtype', 'attention_impl', 'scan_layers')} \
        == {'dtype': 'float32', 'attention_impl': 'explicit', 'scan_layers': True}
    assert c.model.attention_impl == 'explicit'  # the config itself is left as it was
