"""README and config stay in sync with what the code declares."""

from pathlib import Path

import yaml

from edge_tl_ros.nodes.adaptation_node import PARAMETERS as ADAPTATION
from edge_tl_ros.nodes.perception_node import PARAMETERS as PERCEPTION

ROOT = Path(__file__).resolve().parents[1]


def _fmt(v):
    if isinstance(v, bool):
        return 'true' if v else 'false'
    if isinstance(v, str):
        return f'"{v}"'
    return str(v).replace("'", '')


def test_readme_documents_every_parameter_with_its_default():
    readme = (ROOT / 'README.md').read_text()
    for params in (PERCEPTION, ADAPTATION):
        for name, (default, kw) in params.items():
            assert f'| `{name}` | `{_fmt(default)}` |' in readme, f'README lacks {name} (default {default})'
            assert kw['text'] in readme


def test_config_lists_every_parameter():
    cfg = yaml.safe_load((ROOT / 'config' / 'edge_tl.yaml').read_text())
    by_node = {k.split('/')[-1]: v['ros__parameters'] for k, v in cfg.items()}
    assert set(by_node['perception']) == set(PERCEPTION)
    assert set(by_node['adaptation']) == set(ADAPTATION)


def test_readme_has_the_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / 'README.md').read_text()
    assert 'make demo' in readme and 'make test' in readme
    assert 'make test' in (ROOT / '.ci' / 'run').read_text()
