"""The package's layers: programs apart from the library, no import cycle."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'transformer'
PROGRAMS = {'train', 'evaluate', 'translate', 'average', 'summary', 'plot_attention',
            'report', 'prepare', 'score', 'export', 'preflight'}


def imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports (at any depth of the file)."""
    graph = {}
    for path in PACKAGE.glob('*.py'):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == 'transformer':
                    found |= {alias.name for alias in node.names}
                elif node.module.startswith('transformer.'):
                    found.add(node.module.split('.')[1])
            elif isinstance(node, ast.Import):
                found |= {a.name.split('.')[1] for a in node.names
                          if a.name.startswith('transformer.')}
        graph[path.stem] = found
    return graph


def test_programs_are_imported_by_nothing_and_the_library_never_imports_cli():
    graph = imports()
    assert PROGRAMS & set(graph) >= {'train', 'evaluate', 'translate', 'average', 'summary',
                                     'plot_attention'}
    for module, imported in graph.items():
        assert not imported & PROGRAMS, f'{module} imports the program(s) {imported & PROGRAMS}'
        if module not in PROGRAMS:
            assert 'cli' not in imported, f'library module {module} imports cli'


def test_the_allocator_restarts_exactly_the_programs():
    from transformer import allocator
    assert set(allocator.PROGRAMS) == PROGRAMS


def test_no_import_cycle():
    graph = imports()
    state = {}

    def visit(module, path):
        if state.get(module) == 'done':
            return
        assert state.get(module) != 'open', f'import cycle: {" -> ".join(path + [module])}'
        state[module] = 'open'
        for other in sorted(graph.get(module, ())):
            visit(other, path + [module])
        state[module] = 'done'

    for module in sorted(graph):
        visit(module, [])


def top_level_imports(module: str) -> set[str]:
    """What `module` imports at its top, when it is imported: package modules by their name
    (`errors`), others by their top package (`jax`)."""
    def name(dotted: str) -> str:
        parts = dotted.split('.')
        return parts[1] if parts[0] == 'transformer' and len(parts) > 1 else parts[0]

    found = set()
    for node in ast.parse((PACKAGE / f'{module}.py').read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module == 'transformer':
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(name(node.module))
        elif isinstance(node, ast.Import):
            found |= {name(alias.name) for alias in node.names}
    return found


def test_the_ground_floor_imports_no_project_module():
    # errors.py is what every module may import; the supervisor, which starts before JAX,
    # imports only it.
    graph = imports()
    assert graph['errors'] == set()
    assert graph['supervisor'] == {'errors'}
    # The package's start-up, before JAX loads, installs the signal handler of stopping.py:
    # at its top it imports only errors of the project and nothing of JAX (the loop's
    # agreement imports distributed where it is called).
    top = top_level_imports('stopping')
    assert top & set(graph) == {'errors'}
    assert not top & {'jax', 'numpy', 'flax', 'tqdm'}, top
    assert top_level_imports('__init__') & set(graph) == {'allocator', 'stopping', 'supervisor'}
    # The names of a work directory's files: importable by data, metrics, distributed without
    # pulling in Orbax, SentencePiece or the config schema.
    assert graph['workdir'] == {'errors'}
    # The keys of a checkpoint's info: readable by every module that reads a run.
    assert graph['checkpoint_info'] == set()


def test_checkpoint_is_orbax_input_and_output_only():
    # Which checkpoints a decoding program reads, and how their parameters become a model, is
    # saved_runs.py's; checkpoint.py knows of a work directory only where its checkpoints are.
    graph = imports()
    assert graph['checkpoint'] == {'errors', 'workdir'}
    assert 'checkpoint' in graph['saved_runs']


# The package stays flat (`from transformer import search`, `python -m transformer.train`); its
# roles are this table, in layers from the ground up, and the README's code map follows it. A
# module imports only modules of its own role or of the roles before it.
ROLES = {
    'foundation': {'errors', 'supervisor', 'allocator', 'workdir', 'paper', 'checkpoint_info',
                   'event_file'},
    'config': {'config'},
    'text and data': {'tokenizer', 'synthetic', 'tfds_compat', 'tfds_source', 'data',
                      'batching', 'vocabulary'},
    'model': {'multi_head_attention', 'layers', 'model', 'sharding', 'model_stats'},
    'decoding': {'search', 'alignment', 'host_decode', 'bleu'},
    'training': {'schedule', 'train_step', 'early_stopping', 'metrics', 'profiler',
                 'distributed', 'stopping', 'checkpoint', 'run_config', 'evaluators'},
    'saved runs and export': {'saved_runs', 'exporting', 'export_ctranslate2',
                              'export_huggingface', 'exported'},
    'planning': {'targets', 'plan'},
    'programs': {'__init__', 'cli', 'plots'} | PROGRAMS,
}


def test_every_module_has_one_role_and_imports_only_its_own_or_lower_roles():
    graph = imports()
    placed = [m for modules in ROLES.values() for m in modules]
    assert len(placed) == len(set(placed)), 'a module in two roles'
    assert set(placed) == set(graph), (f'modules without a role in ROLES: '
                                       f'{sorted(set(graph) - set(placed))}; roles naming no '
                                       f'module: {sorted(set(placed) - set(graph))}')
    level = {m: i for i, modules in enumerate(ROLES.values()) for m in modules}
    for module, imported in graph.items():
        above = sorted(m for m in imported if level[m] > level[module])
        assert not above, f'{module} ({list(ROLES)[level[module]]}) imports {above} of a later role'
