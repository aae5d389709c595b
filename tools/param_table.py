"""Print the nodes' parameter reference as Markdown (pasted into README.md; a test keeps them in sync).

    .venv/bin/python tools/param_table.py
"""

from edge_tl_ros.nodes.adaptation_node import PARAMETERS as ADAPTATION
from edge_tl_ros.nodes.perception_node import PARAMETERS as PERCEPTION


def fmt_default(v) -> str:
    if isinstance(v, bool):
        return 'true' if v else 'false'
    if isinstance(v, str):
        return f'"{v}"'
    return str(v).replace("'", '')


def fmt_range(kw: dict) -> str:
    if kw.get('int_range'):
        return f'{kw["int_range"][0]}..{kw["int_range"][1]}'
    if kw.get('float_range'):
        return f'{kw["float_range"][0]:g}..{kw["float_range"][1]:g}'
    if kw.get('choices'):
        return ' \\| '.join(kw['choices'])
    return ''


def table(params: dict) -> str:
    rows = ['| parameter | default | range / choices | run-time | description |', '|---|---|---|---|---|']
    for name, (default, kw) in params.items():
        rows.append(f'| `{name}` | `{fmt_default(default)}` | {fmt_range(kw)} | '
                    f'{"no" if kw.get("read_only") else "yes"} | {kw["text"]} |')
    return '\n'.join(rows)


if __name__ == '__main__':
    print('#### perception_node\n')
    print(table(PERCEPTION))
    print('\n#### adaptation_node\n')
    print(table(ADAPTATION))
