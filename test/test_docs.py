"""docs/parameters.md, config/edge_tl.yaml and the README stay in sync with what the code declares."""

import importlib.util
import re
from pathlib import Path

import yaml

from edge_tl_ros.nodes.adaptation_node import PARAMETERS as ADAPTATION
from edge_tl_ros.nodes.perception_node import PARAMETERS as PERCEPTION

ROOT = Path(__file__).resolve().parents[1]
PARAMETERS_MD = ROOT / 'docs' / 'parameters.md'


def _param_table():
    spec = importlib.util.spec_from_file_location('param_table', ROOT / 'tools' / 'param_table.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fmt(v):
    if isinstance(v, bool):
        return 'true' if v else 'false'
    if isinstance(v, str):
        return f'"{v}"'
    return str(v).replace("'", '')


def test_parameters_md_documents_every_parameter_with_its_default():
    doc = PARAMETERS_MD.read_text()
    for params in (PERCEPTION, ADAPTATION):
        for name, (default, kw) in params.items():
            assert f'| `{name}` | `{_fmt(default)}` |' in doc, \
                f'docs/parameters.md lacks {name} (default {default}): run tools/param_table.py'
            assert kw['text'] in doc, f'docs/parameters.md has an old description of {name}'


def test_parameters_md_is_what_the_generator_writes():
    assert PARAMETERS_MD.read_text() == _param_table().render(), \
        'docs/parameters.md is out of date: run .venv/bin/python tools/param_table.py'


def _flatten(d, prefix=''):
    # ROS 2 parameter files may nest a dotted name (store.dir) as store: {dir: ...}
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = v
    return out


def test_config_lists_every_parameter():
    cfg = yaml.safe_load((ROOT / 'config' / 'edge_tl.yaml').read_text())
    by_node = {k.split('/')[-1]: _flatten(v['ros__parameters']) for k, v in cfg.items()}
    assert set(by_node['perception']) == set(PERCEPTION)
    assert set(by_node['adaptation']) == set(ADAPTATION)


def test_readme_has_the_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / 'README.md').read_text()
    assert 'make demo' in readme and 'make test' in readme
    assert 'make test' in (ROOT / '.ci' / 'run').read_text()


def test_relative_links_in_readme_and_docs_resolve():
    for md in [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]:
        for target in re.findall(r'\]\(([^)\s]+)\)', md.read_text()):
            if re.match(r'[a-z]+:', target) or target.startswith('#'):
                continue
            path = (md.parent / target.split('#')[0]).resolve()
            assert path.exists(), f'{md.relative_to(ROOT)} links to missing {target}'
