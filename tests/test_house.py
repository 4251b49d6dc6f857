"""The shape of the repository: no import cycle (lazy imports counted), the
layering contracts hold, ruff is clean, scripts stay thin, the README fits one
sitting and every relative link in the docs resolves; the 0.2.0 module paths
still import; constructors reject unknown arguments; one training step."""
import ast
import glob
import os.path as osp
import re
import subprocess
import sys
import warnings

import pytest
from helpers import ROOT

PACKAGE = osp.join(ROOT, 'pmm_torchreid')
BIN = osp.dirname(sys.executable)


def _modules():
    mods = {}
    for path in glob.glob(osp.join(PACKAGE, '**', '*.py'), recursive=True):
        name = osp.relpath(path, ROOT)[:-3].replace(osp.sep, '.')
        mods[name[:-len('.__init__')] if name.endswith('.__init__') else name] = path
    return mods


def _import_graph():
    """module -> the package modules it imports, at module level or inside
    functions (every import statement counts)."""
    mods = _modules()

    def owner(name):
        while name not in mods and '.' in name:
            name = name.rsplit('.', 1)[0]
        return name if name in mods else None

    graph = {}
    for mod, path in mods.items():
        is_pkg = path.endswith('__init__.py')
        edges = set()
        for node in ast.walk(ast.parse(open(path).read())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ''
                if node.level:
                    parts = mod.split('.') if is_pkg else mod.split('.')[:-1]
                    parts = parts[:len(parts) - (node.level - 1)]
                    base = '.'.join(parts + ([base] if base else []))
                targets = [base + '.' + a.name for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                if target.split('.')[0] == 'pmm_torchreid':
                    found = owner(target)
                    if found and found != mod:
                        edges.add(found)
                        break
        graph[mod] = edges
    return graph


def _cycles(graph):
    """The strongly connected components of more than one module."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}
    assert _cycles(graph) == [['a', 'b', 'c']]
    assert _cycles({'a': {'b'}, 'b': set()}) == []


def test_the_package_has_no_import_cycle_lazy_imports_counted():
    graph = _import_graph()
    assert len(graph) > 40 and sum(map(len, graph.values())) > 80
    assert _cycles(graph) == []


def test_subpackages_by_concern():
    packages = sorted(osp.basename(osp.dirname(p)) for p in
                      glob.glob(osp.join(PACKAGE, '*', '__init__.py')))
    assert {'models', 'data', 'config', 'engine', 'metrics', 'visualize',
            'deploy', 'utils', 'cli'} <= set(packages)


def test_lazy_imports_say_why():
    """A function-level import stays only for an optional dependency or to
    keep start-up light, with a ``# lazy:`` reason on its line or above."""
    for path in glob.glob(osp.join(PACKAGE, '**', '*.py'), recursive=True):
        lines = open(path).read().split('\n')
        for node in ast.walk(ast.parse('\n'.join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        here = lines[sub.lineno - 1] + lines[sub.lineno - 2]
                        assert '# lazy:' in here, (path, sub.lineno)


def _run(args):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_the_layering_contracts_hold():
    proc = _run([osp.join(BIN, 'lint-imports')])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert 'broken' in proc.stdout and '0 broken' in proc.stdout


def test_ruff_is_clean():
    proc = _run([sys.executable, '-m', 'ruff', 'check', 'pmm_torchreid',
                 'scripts', 'tests'])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_scripts_are_thin():
    sizes = {osp.basename(p): sum(1 for _ in open(p))
             for p in glob.glob(osp.join(ROOT, 'scripts', '*.py'))}
    assert len(sizes) >= 10
    assert {k: v for k, v in sizes.items() if v > 60} == {}


def test_the_readme_fits_one_sitting():
    with open(osp.join(ROOT, 'README.md')) as f:
        text = f.read()
    assert len(text.splitlines()) <= 300
    for needed in ('make demo', 'make test', 'scripts/main.py', 'pytest'):
        assert needed in text, needed


def _anchor(title):
    """GitHub's anchor of a heading."""
    title = re.sub(r'[`*]', '', title.strip().lower())
    title = re.sub(r'[^\w\- ]', '', title)
    return title.replace(' ', '-')


def _anchors(path):
    seen, out = {}, set()
    in_code = False
    for line in open(path):
        if line.startswith('```'):
            in_code = not in_code
        if in_code:
            continue
        m = re.match(r'#{1,6} (.*)', line)
        if m:
            a = _anchor(m.group(1))
            n = seen.get(a, 0)
            seen[a] = n + 1
            out.add(a if n == 0 else '{}-{}'.format(a, n))
    return out


def test_every_relative_link_in_the_docs_resolves():
    pages = [osp.join(ROOT, 'README.md')] + glob.glob(osp.join(ROOT, 'docs',
                                                                '*.md'))
    checked, broken = 0, []
    for page in pages:
        text = re.sub(r'```.*?```', '', open(page).read(), flags=re.S)
        for target in re.findall(r'\]\(([^)\s]+)\)', text):
            if re.match(r'[a-z]+:', target):
                continue  # http(s), mailto
            path, _, anchor = target.partition('#')
            full = osp.normpath(osp.join(osp.dirname(page), path)) if path \
                else page
            checked += 1
            if not osp.exists(full):
                broken.append((page, target))
            elif anchor and full.endswith('.md') and \
                    anchor not in _anchors(full):
                broken.append((page, target))
    assert checked > 50
    assert broken == []


def _forget_old_paths(monkeypatch):
    """As in a fresh process: no old path imported yet."""
    import pmm_torchreid
    from pmm_torchreid.compat import MOVED
    for old in MOVED:
        monkeypatch.delitem(sys.modules, old, raising=False)
        name = old.split('.')[-1]
        if name in vars(pmm_torchreid):  # (getattr would import it)
            monkeypatch.delattr(pmm_torchreid, name)
    return MOVED


def test_the_old_flat_module_paths_still_import(monkeypatch):
    import importlib

    import pmm_torchreid
    from pmm_torchreid.engine import records
    for old, new in _forget_old_paths(monkeypatch).items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            module = importlib.import_module(old)
        assert module is importlib.import_module(new)
        assert module.__spec__.name == new  # the module keeps its own spec
        assert any(issubclass(w.category, DeprecationWarning) and new in
                   str(w.message) for w in caught), old
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)
        from pmm_torchreid.records import RunRecordsMixin
    assert RunRecordsMixin is records.RunRecordsMixin
    assert pmm_torchreid.HardMix.__module__ == 'pmm_torchreid.models.guidance'


@pytest.mark.parametrize('name', ['pmm_resnet18', 'bdb_resnet18',
                                  'fmn_resnet18', 'magnifiernet_resnet18'])
def test_constructors_reject_unknown_arguments(name):
    from pmm_torchreid.models import MODEL_FACTORY
    with pytest.raises(TypeError, match='embeding_dim'):
        MODEL_FACTORY[name](num_classes=5, pretrained=False, embeding_dim=256)


def test_one_place_knows_the_model_families():
    from pmm_torchreid.models import MODEL_FACTORY, NETWORKS
    from pmm_torchreid.models.families import FAMILIES, family_of
    assert set(NETWORKS) == set(FAMILIES)
    for name in MODEL_FACTORY:
        assert family_of(name) is not None, name
    assert family_of('osnet_x0_25') is None
    assert family_of('pmmx') is None


def test_every_engine_trains_with_the_one_step():
    from pmm_torchreid.engine import ComparisonEngine, PMMEngine
    for cls in (ComparisonEngine, ):
        assert 'forward_backward' not in vars(cls)
        assert issubclass(cls, PMMEngine)
    assert {'model_inputs', 'losses'} <= set(vars(ComparisonEngine))


def test_every_entry_point_names_a_main_that_takes_argv():
    import importlib
    import inspect
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        pytest.skip('tomllib needs Python 3.11')
    with open(osp.join(ROOT, 'pyproject.toml'), 'rb') as f:
        scripts = tomllib.load(f)['project']['scripts']
    assert 'pmm-train' in scripts and len(scripts) >= 5
    for name, target in scripts.items():
        module, _, attr = target.partition(':')
        fn = getattr(importlib.import_module(module), attr)
        assert 'argv' in inspect.signature(fn).parameters, name


#: the names each 0.2.0 module exported (its ``__all__``), by old module path
OLD_ALL = {'backbones': ['Backbone', 'BACKBONES', 'build_backbone', 'feature_map_size',
               'fetch_osnet_x0_25_weights'],
 'checkpoint': ['to_plain', 'atomic_write', 'save_checkpoint', 'load_checkpoint',
                'resume_from_checkpoint', 'load_pretrained_weights', 'capture_rng_state',
                'restore_rng_state', 'unwrap'],
 'checks': ['check_config', 'check_paths', 'DATASET_LAYOUTS', 'fail'],
 'comparison_engine': ['ComparisonEngine', 'RecordedComparisonEngine', 'engine_class'],
 'config': ['get_default_config', 'add_pmm_config', 'add_comparison_config',
            'is_pmm_model', 'is_bdb_model', 'is_fmn_model', 'is_magnifiernet_model',
            'is_comparison_model', 'takes_no_mix', 'uses_pmm_engine', 'resolved_top_k',
            'mixed_blocks', 'merge_file', 'merge_list', 'imagedata_kwargs',
            'model_kwargs', 'optimizer_kwargs', 'lr_scheduler_kwargs', 'engine_kwargs',
            'comparison_engine_kwargs', 'engine_run_kwargs', 'dump_differences'],
 'curves': ['curve_columns', 'CurveLog', 'read_curves'],
 'data': ['Cutout', 'build_datamanager', 'BadImageError', 'read_image',
          'install_safe_image_reader', 'find_bad_images', 'drop_bad_images'],
 'distributed': ['LaunchInfo', 'LostRankError', 'launch_info', 'per_rank_batch',
                 'check_config', 'init', 'finish', 'is_active', 'rank', 'world_size',
                 'is_main', 'rank_seed', 'DistributedIdentitySampler',
                 'use_distributed_train_loader', 'with_sync_bn', 'wrap_model',
                 'stop_if_any_failed', 'gather_objects', 'wait_for_main',
                 'broadcast_buffers', 'average', 'is_comm_error', 'lost_contact_error'],
 'engine': ['PMMEngine', 'RecordedPMMEngine', 'amp_settings'],
 'fmn': ['FMN', 'FeatureMask', 'LOW_LEVEL_SPLIT', 'split_backbone'],
 'guidance': ['grad_cam', 'block_mask', 'random_block_mask', 'replaced_fraction',
              'sample_negatives', 'hard_mix', 'Mixed', 'MixRule', 'HardMix', 'Cutout',
              'CutMix', 'ACutMix', 'BatchDrop', 'MIX_RULES', 'MIX_MODES', 'build_mixer',
              'check_block_grid', 'blocks_for_ratio', 'BlockChoice', 'with_partners'],
 'launch': ['build_parser', 'setup_config', 'build_model', 'build_engine', 'main',
            'write_results', 'read_results'],
 'losses': ['batch_hard_triplet', 'smoothed_cross_entropy', 'mixed_targets',
            'mixed_cross_entropy'],
 'magnifiernet': ['MagnifierNet', 'GatedFusion', 'semantic_diversity_loss',
                  'region_shares', 'downsample_regions', 'occlusion_keep'],
 'mask_pictures': ['REGION_COLOURS', 'mask_views', 'MaskPictures'],
 'metrics': ['evaluate_rank', 'evaluate_rank_details', 'RankResult',
             'DEFAULT_MEMORY_BUDGET'],
 'models': ['PMM', 'BDB', 'BatchDropBlock', 'GlobalHead', 'PartHead', 'MODEL_FACTORY',
            'model_backbone'],
 'optim': ['WarmupMultiStepLR', 'build_lr_scheduler'],
 'parsing': ['REGION_NAMES', 'NUM_REGIONS', 'LABEL_SETS', 'PART_TO_REGION', 'BANDS',
             'region_table', 'band_regions', 'RegionSource', 'PairedTransform',
             'RegionMaskedDataset', 'attach_region_masks'],
 'records': ['RunRecordsMixin', 'with_run_records', 'fast_ranking'],
 'registry': ['register', 'register_into'],
 'splits': ['carve_validation', 'hold_out_validation', 'write_cuhk01_splits'],
 'synthetic': ['SyntheticPersons', 'DATASETS', 'prepare', 'generate', 'FORMAT_VERSION',
               'PART_LABELS', 'PARTS_VERSION', 'prepare_parts', 'generate_parts',
               'parts_folder', 'is_synthetic_dataset'],
 'visualize': ['stage_views', 'test_time_views', 'StagePictures', 'render_panel',
               'contact_sheet', 'panel_size', 'overlay', 'upsample_cam', 'upsample_mask',
               'stage_overlap', 'summarize_overlap', 'mask_iou', 'cam_cosine',
               'chance_iou', 'format_overlap', 'draw_partners', 'json_safe']}


def test_every_name_of_the_0_2_0_modules_still_imports_from_its_old_path():
    import importlib
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)
        for module, names in OLD_ALL.items():
            mod = importlib.import_module('pmm_torchreid.' + module)
            assert [n for n in names if not hasattr(mod, n)] == [], module


def test_old_names_that_clashed_warn_and_give_the_renamed_object():
    from pmm_torchreid.models import guidance
    from pmm_torchreid.utils import distributed
    with pytest.warns(DeprecationWarning, match='CutoutMix'):
        assert guidance.Cutout is guidance.CutoutMix
    with pytest.warns(DeprecationWarning, match='check_world_config'):
        assert distributed.check_config is distributed.check_world_config
    from pmm_torchreid import visualize
    with pytest.warns(DeprecationWarning, match='staged_network'):
        assert visualize.unwrap_model is visualize.staged_network
    assert 'Cutout' not in guidance.__all__
    with pytest.raises(AttributeError):
        guidance.NoSuchRule


def test_old_module_names_are_attributes_of_the_package(monkeypatch):
    import pmm_torchreid
    _forget_old_paths(monkeypatch)
    with pytest.warns(DeprecationWarning, match='models.guidance'):
        assert pmm_torchreid.guidance.grad_cam is pmm_torchreid.grad_cam
    with pytest.raises(AttributeError):
        pmm_torchreid.no_such_module
