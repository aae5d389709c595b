"""`edge-tl demo` end to end on a tiny GTSRB-layout npz and the toy bundle (real bags, real nodes)."""

import json
import os
import subprocess
import sys

import numpy as np

from edge_tl_ros.toy import TOY_CLASSES, make_toy_bundle, toy_frames


def test_demo_runs_end_to_end(tmp_path, ros_domain):
    rng = np.random.default_rng(0)
    x, y = toy_frames(rng, 400, size=16)
    npz = tmp_path / 'toy_gtsrb.npz'
    np.savez(npz, X_train=x[:10], y_train=y[:10].astype(np.uint8), X_test=x, y_test=y.astype(np.uint8),
             class_names=np.array(TOY_CLASSES))
    toy = make_toy_bundle(tmp_path / 'toy')
    out = tmp_path / 'out'
    cmd = [sys.executable, '-m', 'edge_tl_ros.cli', 'demo', '--data', str(npz), '--model-bundle', str(toy),
           '--teacher-bundle', '', '--label-sources', 'topic', '--shift', 'fog', '--severity', '3',
           '--source-frames', '40', '--adapt-frames', '120', '--eval-frames', '40', '--fps', '30',
           '--upscale', '24', '--adapt-every', '40', '--out', str(out), '--cache', str(tmp_path / 'cache')]
    env = dict(os.environ, ROS_DOMAIN_ID=str(ros_domain))
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert 'edge_tl_ros demo summary' in run.stdout
    s = json.loads((out / 'demo_summary.json').read_text())
    assert [p['frames'] for p in s['phases']] == [40, 40, 120, 40]
    # every frame is accounted for: classified, dropped by the node's newest-frame policy, or lost in
    # transport (a KEEP_LAST history overwritten when this shared machine is busy)
    assert s['published'] == 240 and s['rejected'] == 0
    assert s['received'] + s['lost_in_transport'] == 240 and 0 <= s['lost_in_transport'] < 120
    assert s['frames'] + s['dropped'] == s['received'] and s['frames'] >= 100
    assert sum(p['classified'] for p in s['phases']) == s['frames']
    assert all(p['classified'] >= 10 for p in s['phases']), s['phases']
    assert s['accuracy_source'] > 0.95  # the toy head is right on clean toy frames
    assert len(s['rounds']) >= 1 and all(r['reason'] for r in s['rounds'])
    assert s['label_counts']['topic'] >= 40  # frames may be lost in transport (see above)
    assert s['eval_frames_in_store'] == 0  # evaluation frames never become adaptation data
    assert (out / 'demo_accuracy.png').stat().st_size > 10_000
    # bags are cached: a second run reuses them
    run2 = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert run2.returncode == 0 and 'using cached bags' in run2.stdout


def test_demo_without_data_says_where_to_get_it(tmp_path):
    run = subprocess.run([sys.executable, '-m', 'edge_tl_ros.cli', 'demo', '--data', str(tmp_path / 'none'),
                          '--out', str(tmp_path / 'o'), '--cache', str(tmp_path / 'c')],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert 'download-gtsrb' in run.stderr and 'EDGE_TL_DATA' in run.stderr


def test_demo_on_your_own_bags_with_a_class_map(tmp_path, ros_domain):
    """--bag / --eval-bag with their own topic names and label names (--class-map): the drive's labels reach
    the adaptation node as bundle classes, the evaluation bag is scored before and after and never stored."""
    from edge_tl_ros.bags.io import write_bag

    rng = np.random.default_rng(1)
    mine = ('rot', 'gruen', 'blau')
    start = 1_700_000_000 * 10**9
    drive_x, drive_y = toy_frames(rng, 120, size=24, shifted=True)
    eval_x, eval_y = toy_frames(rng, 40, size=24, shifted=True)
    drive = write_bag(tmp_path / 'drive', drive_x, [mine[i] for i in drive_y], storage='sqlite3',
                      image_topic='/front/image_raw', label_topic='/front/signs', start_stamp=start)
    held = write_bag(tmp_path / 'held', eval_x, [mine[i] for i in eval_y], storage='mcap',
                     image_topic='/front/image_raw', label_topic='/front/signs', start_stamp=start + 10**12)
    cmap = tmp_path / 'map.yaml'
    cmap.write_text('rot: red\ngruen: green\nblau: blue\n')
    toy = make_toy_bundle(tmp_path / 'toy')
    out = tmp_path / 'out'
    cmd = [sys.executable, '-m', 'edge_tl_ros.cli', 'demo', '--bag', str(drive), '--eval-bag', str(held),
           '--label-topic', '/front/signs', '--class-map', str(cmap), '--model-bundle', str(toy),
           '--teacher-bundle', '', '--label-sources', 'topic', '--adapt-every', '40', '--out', str(out)]
    env = dict(os.environ, ROS_DOMAIN_ID=str(ros_domain))
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    s = json.loads((out / 'demo_summary.json').read_text())
    assert [p['kind'] for p in s['phases']] == ['before', 'drive', 'after']
    assert [p['frames'] for p in s['phases']] == [40, 120, 40]
    assert s['domain'] == 'your drive' and s['shift'] is None and s['accuracy_source'] is None
    # the drive's labels arrived under the bundle's names (a label of an unknown name would be dropped)
    assert s['label_counts']['topic'] >= 40, s['label_counts']
    assert len(s['rounds']) >= 1
    assert s['eval_frames_in_store'] == 0
    assert s['accuracy_target_before'] < 0.5  # the shifted toy frames fool the toy head
    assert 'accuracy your drive' in run.stdout

    # an unknown label name is one clear line before anything starts
    cmap.write_text('rot: red\ngruen: green\n')
    bad = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "'blau'" in bad.stderr and 'Traceback' not in bad.stderr
    no_eval = subprocess.run(cmd[:cmd.index('--eval-bag')] + cmd[cmd.index('--eval-bag') + 2:], env=env,
                             capture_output=True, text=True, timeout=120)
    assert no_eval.returncode == 2 and '--eval-bag' in no_eval.stderr


def test_demo_shift_none_builds_unshifted_bags(tmp_path):
    import argparse

    from edge_tl_ros.bags.cli import make_frames
    from edge_tl_ros.bags.io import bag_info, read_labelled_frames
    from edge_tl_ros.demo import build_bags

    rng = np.random.default_rng(0)
    x, y = toy_frames(rng, 30, size=16)
    npz = tmp_path / 'toy_gtsrb.npz'
    np.savez(npz, X_train=x[:5], y_train=y[:5].astype(np.uint8), X_test=x, y_test=y.astype(np.uint8),
             class_names=np.array(TOY_CLASSES))
    args = argparse.Namespace(data=str(npz), cache=str(tmp_path / 'c'), shift='none', severity=4, seed=0,
                              source_frames=10, adapt_frames=10, eval_frames=10, fps=30.0, upscale=24)
    bags = build_bags(args, tmp_path)
    order = np.random.default_rng(0).permutation(30)
    imgs, _ = read_labelled_frames(bags['adapt'], label_topic='/labels')
    np.testing.assert_array_equal(imgs, make_frames(x[order[10:20]], 24))  # no shift applied
    assert bag_info(bags['eval']).custom['shift'] is None
