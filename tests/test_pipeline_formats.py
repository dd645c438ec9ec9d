"""Safe loading and validation of viz_data files (pipeline.formats)."""

import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from fixtures_viz import FIXTURE_RUNS

from pipeline.formats import VizDataError, read_viz_data


def _viz_path(store, run_id):
    return store / "viz" / run_id / FIXTURE_RUNS[run_id]["file"]


class RunsACommand:
    """Unpickling this would run a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = {"circuit_data": RunsACommand(marker), "importances": {}}
    pkl = tmp_path / "viz_data.pkl"
    pkl.write_bytes(pickle.dumps(evil))
    with pytest.raises(VizDataError, match=r"viz_data\.pkl.*refusing to load global posix\.system"):
        read_viz_data(pkl)
    pt = tmp_path / "viz_data.pt"
    torch.save(evil, pt)
    with pytest.raises(VizDataError, match=r"viz_data\.pt.*cannot be loaded safely"):
        read_viz_data(pt)
    assert not marker.exists()
    # Sanity: the payload is real (plain pickle would run it).
    pickle.loads(pickle.dumps(RunsACommand(marker)))
    assert marker.exists()


def test_numpy_pair_data_needs_and_gets_the_allow_list(viz_store):
    path = _viz_path(viz_store, "fixture_a/brackets/prune_v4/6")
    with pytest.raises(Exception, match="numpy"):
        torch.load(path, weights_only=True)  # plain weights_only refuses ndarrays
    viz = read_viz_data(path)
    raw = torch.load(path, weights_only=False)  # trusted test fixture: an independent read
    assert len(viz.pair_data) == len(raw["importances"]["pair_data"]) > 0
    assert isinstance(raw["importances"]["pair_data"][0][0], np.ndarray)
    np.testing.assert_array_equal(viz.pair_data[0].matrix, raw["importances"]["pair_data"][0][0])


def test_pickle_variant_with_nested_pair_data_and_tensor_keys(viz_store):
    path = _viz_path(viz_store, "fixture_a/quotes/prune_v4/k_optim")
    with open(path, "rb") as f:
        raw = pickle.load(f)  # trusted test fixture
    viz = read_viz_data(path)
    nested = raw["importances"]["pair_data"]
    assert len(viz.pair_data) == sum(len(w) for w in nested)
    assert viz.n_nodes == sum(len(v) for v in raw["circuit_data"].values())
    loc, by_ch = next(iter(raw["samples"].items()))
    ch_t = next(iter(by_ch))
    assert isinstance(ch_t, torch.Tensor)
    snips = list(viz.snippets(loc, int(ch_t)))
    assert len(snips) == sum(len(by_ch[ch_t][f][0]) + len(by_ch[ch_t][f][1]) for f in by_ch[ch_t])
    assert snips[0].tokens.dtype == np.int64


@pytest.mark.parametrize(
    "corrupt, message",
    [
        ("truncate", r"cannot be loaded safely"),
        ("no_importances", r"missing key 'importances'"),
        ("short_ch_losses", r"ch_interv_losses\[.*\] has \d+ values for \d+ circuit nodes"),
        ("bad_location", r"circuit_data has a node location 7 that is not a name"),
        ("bad_acts_shape", r"task_samples acts\[.*\] has shape"),
        ("bad_snippet", r"samples\[.*\]\[0\.1\] top\[0\]: tokens and activations should be 1-D of equal length"),
    ],
)
def test_bad_files_fail_with_file_and_problem(viz_store, tmp_path, corrupt, message):
    src = _viz_path(viz_store, "fixture_a/quotes/prune_v4/4")
    dst = tmp_path / "viz_data.pt"
    if corrupt == "truncate":
        shutil.copy(src, dst)
        with open(dst, "r+b") as f:
            f.truncate(dst.stat().st_size // 2)
    else:
        raw = torch.load(src, weights_only=False)
        if corrupt == "no_importances":
            del raw["importances"]
        elif corrupt == "short_ch_losses":
            loc = next(iter(raw["circuit_data"]))
            raw["importances"]["ch_interv_losses"][loc] = []
        elif corrupt == "bad_location":
            raw["circuit_data"][7] = torch.tensor([1])  # an unknown *name* is kept (test_release_locations)
        elif corrupt == "bad_acts_shape":
            acts = raw["importances"]["task_samples"][1]
            loc = next(iter(acts))
            ch = next(iter(acts[loc]))
            acts[loc][ch] = acts[loc][ch][:, :3]
        elif corrupt == "bad_snippet":
            by_ch = next(iter(raw["samples"].values()))
            tokens, acts, pos = by_ch[next(iter(by_ch))][0.1][1][0]
            by_ch[next(iter(by_ch))][0.1][1][0] = (tokens, acts[:-1], pos)
        torch.save(raw, dst)
    with pytest.raises(VizDataError, match=message) as e:
        read_viz_data(dst)
    assert str(dst) in str(e.value)
