"""The programs restart themselves once with tcmalloc when it is installed (allocator.py)."""

from conftest import run_train

from transformer import allocator

PROGRAM = ['/usr/bin/python3', '-m', 'transformer.train', '--workdir=/tmp/x']


def test_a_program_is_restarted_once_with_tcmalloc_preloaded():
    def found():
        return 'libtcmalloc_minimal.so.4'

    env = allocator.reexec_env(PROGRAM, {'PATH': '/bin'}, found)
    assert env == {'PATH': '/bin', 'LD_PRELOAD': 'libtcmalloc_minimal.so.4'}
    # An existing preload is kept; once tcmalloc is in it, no second restart.
    env = allocator.reexec_env(PROGRAM, {'LD_PRELOAD': 'libfoo.so'}, found)
    assert env['LD_PRELOAD'] == 'libtcmalloc_minimal.so.4:libfoo.so'
    assert allocator.reexec_env(PROGRAM, env, found) is None


def test_no_restart_when_turned_off_not_installed_or_not_a_program():
    def found():
        return 'libtcmalloc_minimal.so.4'

    assert allocator.reexec_env(PROGRAM, {'TRANSFORMER_TCMALLOC': '0'}, found) is None
    assert allocator.reexec_env(PROGRAM, {}, lambda: None) is None
    for argv in (['python', '-m', 'pytest'], ['python', '-c', 'import transformer'],
                 ['python', 'benchmarks/multi30k.py'], ['python', '-m']):
        assert allocator.reexec_env(argv, {}, found) is None, argv


def test_train_says_which_allocator_it_runs_on(tmp_path):
    # Whatever this machine has: tcmalloc when installed, else the hint to install it.
    out = run_train(tmp_path, '--config.train.steps=2').stderr
    if allocator.find_tcmalloc():
        assert 'Memory allocator: tcmalloc\n' in out, out[-2000:]
    else:
        assert 'Memory allocator: system malloc (CPU steps run about 1.3x faster' in out
