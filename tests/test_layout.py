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


def test_the_ground_floor_imports_no_project_module():
    # errors.py is what every module may import; the supervisor, which starts before JAX,
    # imports only it.
    graph = imports()
    assert graph['errors'] == set()
    assert graph['supervisor'] == {'errors'}
    # The names of a work directory's files: importable by data, metrics, distributed without
    # pulling in Orbax, SentencePiece or the config schema.
    assert graph['workdir'] == {'errors'}
    # The keys of a checkpoint's info: readable by every module that reads a run.
    assert graph['checkpoint_info'] == set()
