"""The house rules of the code base, read from the source (no broker, no database): no import cycles, each
floor imports only from the floors below it, and the generic supervisor knows nothing of carrot.

Every import counts, also one inside a function: a late import hides a cycle from Python, not from a
reader who follows it.
"""
import ast
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ('carrot', 'supervisor')


def module_files():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob('*.py')):
            if 'migrations' in path.parts:
                continue
            parts = list(path.relative_to(ROOT).with_suffix('').parts)
            if parts[-1] == '__init__':
                parts.pop()
            yield '.'.join(parts), path


MODULES = dict(module_files())


def resolve(name: str) -> str | None:
    """The module of ours an import names (a name imported from a package may be a module of it)."""
    while name and name not in MODULES:
        name = name.rpartition('.')[0]
    return name or None


def imports_of(module: str) -> set[str]:
    path = MODULES[module]
    package = module if path.name == '__init__.py' else module.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                anchor = package.split('.')
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = '.'.join(anchor + ([base] if base else []))
            # `from a.b import c`: the module a.b.c if there is one, else (a name defined in a.b) a.b
            names = [f'{base}.{alias.name}' if f'{base}.{alias.name}' in MODULES else base
                     for alias in node.names]
        else:
            continue
        for name in names:
            target = resolve(name)
            if target and target != module and target.split('.')[0] in PACKAGES:
                found.add(target)
    # importlib-style lazy exports (supervisor/__init__.py) are imports too
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def find_cycle() -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module):
        state[module] = 1
        stack.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def test_no_import_cycles():
    assert find_cycle() is None, ' -> '.join(find_cycle())


def test_the_graph_is_read_at_all():
    # A parser that finds nothing would pass the other tests: pin a few known arrows.
    assert 'carrot.consume.processor' in GRAPH['carrot.consume.loop']
    assert 'carrot.amqp.connection' in GRAPH['carrot.amqp.publisher']
    assert 'supervisor.signals' in GRAPH['supervisor.arbiter']


def outside_imports(module: str) -> set[str]:
    """Top-level names of every package `module` imports, ours or not."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split('.')[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split('.')[0])
    return found


@pytest.mark.parametrize('module', [m for m in MODULES if m.startswith('supervisor')])
def test_the_supervisor_knows_nothing_of_carrot_django_or_pika(module):
    assert not outside_imports(module) & {'carrot', 'django', 'pika'}, module


# Each floor may import from the floors below it, never from one above. Modules not listed (the 1.x faces,
# Django's usual places, the monitor) sit on top.
# A name ending in '.*' is a package and everything in it; any other name is that module alone.
FLOORS = [
    ('leaves', ['carrot.exceptions', 'carrot.text', 'carrot.backoff', 'carrot.names']),
    ('config', ['carrot.config.*']),
    # carrot.backends.compat imports Django's tasks API and nothing of carrot: the worker runs a django.tasks
    # Task with it (carrot.consume.djangotask); the backend itself sits on top.
    ('registry', ['carrot.registry', 'carrot', 'carrot.backends.compat']),
    ('amqp', ['carrot.amqp.*']),
    ('rows', ['carrot.publish.arguments', 'carrot.schedule.rules', 'carrot.models', 'carrot.dbfaults',
              'carrot.commits', 'carrot.statements']),
    ('logic', ['carrot.publish.*', 'carrot.consume.*', 'carrot.schedule.*', 'carrot.helper_tasks',
               'carrot.checks']),
    ('run', ['carrot.run.*']),
]


def floor_of(module: str) -> int | None:
    best = None
    for index, (_, names) in enumerate(FLOORS):
        for name in names:
            prefix = name.removesuffix('.*')
            if module == prefix or (name.endswith('.*') and module.startswith(prefix + '.')):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    return best[0] if best else None


@pytest.mark.parametrize('module', [m for m in MODULES if floor_of(m) is not None])
def test_no_arrow_runs_up_a_floor(module):
    own = floor_of(module)
    upward = sorted(t for t in GRAPH[module] if t.startswith('carrot')
                    and (floor_of(t) is None or floor_of(t) > own))
    assert not upward, f'{module} ({FLOORS[own][0]}) imports {upward} from a floor above it'


def test_the_pika_layer_is_the_only_consumer_of_pika():
    # pika is imported by carrot.amqp and by nothing else of carrot (carrot.config builds connection
    # parameters inside a method, for the code that connects).
    users = sorted(m for m in MODULES if m.startswith('carrot') and 'pika' in outside_imports(m)
                   and not m.startswith('carrot.amqp'))
    assert users == ['carrot.config.schema'], users


def test_every_module_has_a_docstring():
    missing = [m for m, path in MODULES.items()
               if path.stat().st_size and ast.get_docstring(ast.parse(path.read_text())) is None
               and not path.name == '__init__.py' or (path.name == '__init__.py' and path.stat().st_size
                                                      and ast.get_docstring(ast.parse(path.read_text())) is None)]
    assert not missing, missing


if __name__ == '__main__':  # python tests/test_layout.py: print the graph
    for module in sorted(GRAPH):
        print(module, '->', ', '.join(sorted(GRAPH[module])) or '-', sep=' ')
    print('cycle:', find_cycle())
    os._exit(0)
