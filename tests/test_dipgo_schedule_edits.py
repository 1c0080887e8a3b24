"""Schedules edited by hand: resize follows the rows as they are, and a file whose graph
indices or module paths do not fit is refused at load time with an error naming the field."""
import json

import pytest
import torch

from shortcut_kernels.dipgo import Schedule, deepcache, skip_steps

from _dipgo_models import tiny_sd15_unet


@pytest.fixture(scope="module")
def sd():
    return tiny_sd15_unet()


def _edited_file(tmp_path, s: Schedule, edit) -> Schedule:
    """``s`` written to JSON, ``edit(dict)`` applied to the document, read back."""
    d = s.to_dict()
    edit(d)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(d))
    return path


def _full_calls(s: Schedule) -> list[int]:
    return [c for c in range(s.calls) if bool(s.keep[c].all())]


def test_resize_follows_hand_edited_rows(sd, tmp_path):
    built = deepcache(sd, 50, 3, 0)
    edited_rows = list(range(20, 30))  # a stretch of retrieval calls made full by hand

    def make_full(d):
        d["keep"] = ["1" * len(row) if c in edited_rows else row for c, row in enumerate(d["keep"])]
        d.pop("macs_kept"), d.pop("modes")

    edited = Schedule.load(_edited_file(tmp_path, built, make_full))
    assert edited.name == "deepcache" and edited.params == built.params  # still claims its builder
    assert edited.macs_kept > built.macs_kept + 0.08  # the premise: the edit is not a rounding matter
    for calls in (20, 25, 99):
        r = edited.resize(calls)
        assert r.calls == calls and bool(r.keep[0].all())
        assert abs(r.macs_kept - edited.macs_kept) < 0.02, (calls, r.macs_kept, edited.macs_kept)
        # the edited stretch stays full where it maps to (the rows keep their density, so a
        # halved stretch may shift by one call at an edge; rebuilding kept 1 of 5 there)
        mapped = {round(t * (calls - 1) / 49) for t in edited_rows}
        assert len(mapped & set(_full_calls(r))) >= 0.8 * len(mapped), (calls, sorted(mapped), _full_calls(r))
        assert "resized_from" in r.params  # not passed off as what the builder makes
    # a row edited from full to reuse is followed too: fewer MACs than the builder's
    def make_reuse(d):
        d["keep"] = [row if c % 2 == 0 or c < 2 else "0" * len(row) for c, row in enumerate(d["keep"])]
        d.pop("macs_kept"), d.pop("modes")

    lean = Schedule.load(_edited_file(tmp_path, built, make_reuse))
    assert lean.macs_kept < built.macs_kept - 0.1
    assert abs(lean.resize(20).macs_kept - lean.macs_kept) < 0.02


def test_resize_still_rebuilds_what_a_builder_made(sd, tmp_path):
    built = deepcache(sd, 50, 3, 0)
    loaded = Schedule.load(built.save(tmp_path / "s.json"))
    r = loaded.resize(25)
    assert r == deepcache(sd, 25, 3, 0) and r.params == built.params
    e = skip_steps(sd, 50, compute=[10, 20, 40])
    assert e.resize(25) == skip_steps(sd, 25, compute=[0, 5, 10, 20])
    # a resized schedule resized again keeps following its rows
    assert e.resize(25).resize(50).calls == 50


@pytest.mark.parametrize("field, value", [("consumers", [99]), ("producers", [0, 99]), ("consumers", [-2]),
                                          ("index", 17)])
def test_load_refuses_graph_indices_out_of_range(sd, tmp_path, field, value):
    s = deepcache(sd, 6, 2, 0)
    n = len(s.graph)

    def corrupt(d):
        d["graph"]["blocks"][3][field] = value

    path = _edited_file(tmp_path, s, corrupt)
    with pytest.raises(ValueError) as info:
        Schedule.load(path)
    msg = str(info.value)
    assert str(path) in msg and f"graph.blocks[3].{field}" in msg and f"{n - 1}" in msg, msg


def test_load_with_model_refuses_a_module_path_the_model_lacks(sd, tmp_path):
    s = deepcache(sd, 6, 2, 0)

    def rename(d):
        d["graph"]["blocks"][4]["module_paths"] = ["down_blocks.1.resnets.7"]

    path = _edited_file(tmp_path, s, rename)
    Schedule.load(path)  # without a model there is nothing to check it against
    with pytest.raises(ValueError, match=r"down_blocks\.1\.resnets\.7.*another model"):
        Schedule.load(path, model=sd)

    def swap(d):  # paths the model has, on the wrong blocks
        blocks = d["graph"]["blocks"]
        blocks[4]["module_paths"], blocks[5]["module_paths"] = blocks[5]["module_paths"], blocks[4]["module_paths"]

    with pytest.raises(ValueError, match="another model"):
        Schedule.load(_edited_file(tmp_path, s, swap), model=sd)
