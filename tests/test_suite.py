"""The suite itself: what docs/DEVELOPING.md says about it (how many tests,
which can skip and when) is what pytest collects; test files import only
tests/helpers.py, never each other; the fast tier starts no program."""
import ast
import glob
import os.path as osp
import re

import pytest
from helpers import ROOT

TESTS = osp.join(ROOT, 'tests')
DEVELOPING = osp.join(ROOT, 'docs', 'DEVELOPING.md')
#: what the fast tier may still run in a child process: tools that do not
#: import torch and take a second or two
QUICK_TOOLS = ('ruff', 'lint-imports')
#: functions that start a child process (tests/helpers.py's and the files'
#: own wrappers); any call of ``subprocess.*`` counts too
SPAWNS = {'script', 'start', 'Popen', 'torchrun', 'launch_by_hand', 'run_main',
          'run_export'}

def _test_files():
    return sorted(glob.glob(osp.join(TESTS, 'test_*.py')))


def _documented(text, label):
    found = re.search(r'<!-- suite:{} -->(\d+)'.format(label), text)
    assert found, 'docs/DEVELOPING.md has no <!-- suite:{} --> number'.format(label)
    return int(found.group(1))


def test_the_documented_counts_are_what_pytest_collects(collected):
    if not collected.get('whole'):
        pytest.skip('the counts are those of the whole suite: run pytest on tests/ '
                    'with every optional package installed')
    counts = {k: collected[k] for k in ('tests', 'slow', 'files')}
    text = open(DEVELOPING).read()
    got = {label: _documented(text, label) for label in counts}
    assert got == counts, ('docs/DEVELOPING.md says {}, pytest collects {}: '
                           'update the numbers'.format(got, counts))


def _skip_sites():
    """test file -> whether it holds a skip (skipif, importorskip, skip())."""
    sites = set()
    for path in _test_files():
        src = open(path).read()
        if re.search(r'skipif\(|importorskip\(|pytest\.skip\(', src):
            sites.add(osp.basename(path))
    return sites


def test_every_file_that_can_skip_is_in_the_documented_skip_list():
    text = open(DEVELOPING).read()
    section = text.split('<!-- suite:skips -->')[1].split('<!-- /suite:skips -->')[0]
    listed = set(re.findall(r'`(test_\w+\.py)`', section))
    assert listed == _skip_sites(), (
        'the skip list in docs/DEVELOPING.md names {}, the tests that can skip '
        'are in {}'.format(sorted(listed), sorted(_skip_sites())))


def test_test_files_import_helpers_not_each_other():
    for path in _test_files() + [osp.join(TESTS, 'conftest.py')]:
        for node in ast.walk(ast.parse(open(path).read())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                assert not name.startswith(('test_', 'conftest', 'tests')), (
                    osp.basename(path), name)


def _calls(node):
    """The names a function calls: ``f(...)`` gives f, ``subprocess.run``
    gives subprocess.run (method calls on other objects give nothing)."""
    names = set()
    for call in ast.walk(node):
        if isinstance(call, ast.Call):
            if isinstance(call.func, ast.Name):
                names.add(call.func.id)
            elif isinstance(call.func, ast.Attribute) and \
                    isinstance(call.func.value, ast.Name) and \
                    call.func.value.id == 'subprocess':
                names.add('subprocess.' + call.func.attr)
    return names


def _spawning_tests(src):
    """The test functions of a file that start a child process, directly or
    through a function or fixture of the same file that does (those that only
    run the quick tools do not count)."""
    tree = ast.parse(src)
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    quick = {name for name, node in funcs.items()
             if any(t in ast.get_source_segment(src, node) for t in QUICK_TOOLS)}
    spawn = {name for name, node in funcs.items() if name not in quick and any(
        c in SPAWNS or c.startswith('subprocess.') for c in _calls(node))}
    grew = True
    while grew:
        grew = False
        for name, node in funcs.items():
            if name in spawn or name in quick:
                continue
            if (_calls(node) | {a.arg for a in node.args.args}) & spawn:
                spawn.add(name)
                grew = True
    return {name: funcs[name] for name in spawn if name.startswith('test_')}


def _marked_slow(src, node):
    if re.search(r'^pytestmark = pytest\.mark\.slow', src, re.M):
        return True
    return any('slow' in ast.get_source_segment(src, d) for d in node.decorator_list)


def test_tests_that_start_programs_are_marked_slow():
    """The fast tier (``-m "not slow"``) stays fast: a test that starts a
    child process (each imports torch: seconds) or uses a fixture that does
    is marked ``slow``."""
    unmarked = []
    for path in _test_files():
        src = open(path).read()
        for name, node in _spawning_tests(src).items():
            if not _marked_slow(src, node):
                unmarked.append('{}::{}'.format(osp.basename(path), name))
    assert unmarked == []


def test_the_slow_check_sees_a_spawning_test():
    src = ('def helper():\n    return script("main.py")\n\n'
           'def test_a(tmp_path):\n    helper()\n\n'
           '@pytest.mark.slow\ndef test_b():\n    helper()\n\n'
           'def test_c():\n    pass\n')
    found = _spawning_tests(src)
    assert sorted(found) == ['test_a', 'test_b']
    assert not _marked_slow(src, found['test_a'])
    assert _marked_slow(src, found['test_b'])
