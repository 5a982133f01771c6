"""Optimizer state stored without pickles: safetensors + JSON round trip is exact."""

import json

import pytest
import torch

from hpcalign.errors import ShardError
from hpcalign.roles.checkpoint import list_checkpoints, load_state_dict, save_state_dict
from hpcalign.roles.trainer import check_staleness


def test_adamw_state_round_trips_bitwise(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 5)).pow(2).sum().backward()
        opt.step()
    save_state_dict(opt.state_dict(), str(tmp_path / "o.safetensors"), str(tmp_path / "o.json"))
    json.loads((tmp_path / "o.json").read_text())  # plain JSON, no pickle
    restored = load_state_dict(str(tmp_path / "o.safetensors"), str(tmp_path / "o.json"))
    original = opt.state_dict()
    assert restored["param_groups"] == original["param_groups"]
    for key, state in original["state"].items():
        for name, value in state.items():
            assert torch.equal(restored["state"][key][name], value), (key, name)
    # a fresh optimizer loaded from it continues exactly like the original
    twin = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    twin.load_state_dict(model.state_dict())
    opt2 = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1)
    opt2.load_state_dict(restored)
    x = torch.randn(4, 5)
    for m, o in ((model, opt), (twin, opt2)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_only_complete_checkpoints_are_listed(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-000010").mkdir(parents=True)
    (root / "step-000010" / "state.json").write_text("{}")
    (root / "step-000020.tmp-123").mkdir()  # a checkpoint being written when killed
    (root / "step-000030").mkdir()  # no state.json: incomplete
    assert list_checkpoints(str(tmp_path)) == [10]


@pytest.mark.parametrize("step,version,staleness,ok", [
    (5, 5, 0, True), (5, 4, 0, False), (5, 4, 1, True), (5, 3, 1, False), (5, 6, 1, False),
])
def test_staleness_rule(step, version, staleness, ok):
    if ok:
        check_staleness(step, step, version, staleness, "p.h5")
    else:
        with pytest.raises(ShardError, match="p.h5: sampled for step"):
            check_staleness(step, step, version, staleness, "p.h5")


def test_shard_of_another_step_is_refused():
    with pytest.raises(ShardError, match="sampled for step 4"):
        check_staleness(5, 4, 4, 1, "p.h5")
