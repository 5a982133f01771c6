"""`hpcalign init-model`: builds a loadable model, refuses to overwrite without --force."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hpcalign import cli
from hpcalign.commands import init_model
from hpcalign.errors import UserError
from hpcalign.models.hf import load_model

SMALL = ["--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1",
         "--intermediate", "48"]


def test_builds_the_requested_shape(tmp_path):
    out = tmp_path / "m"
    assert init_model.main([str(out), *SMALL, "--arch", "llama", "--untied", "--seed", "5"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"]) == (32, 1, 2, 1, 48)
    assert config["tie_word_embeddings"] is False and config["vocab_size"] == 44
    model, tok = load_model(str(out))
    assert model(torch.tensor([[1, 4]])).logits.shape == (1, 2, 44)


def test_symbols_set_the_vocabulary(tmp_path):
    out = tmp_path / "m"
    init_model.main([str(out), *SMALL, "--symbols", "xy="])
    _, tok = load_model(str(out))
    assert len(tok) == 7 and tok.encode("yx=", add_special_tokens=False) == [5, 4, 6]
    with pytest.raises(UserError):
        init_model.main([str(tmp_path / "dup"), *SMALL, "--symbols", "xx"])


def test_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = str(tmp_path / "m")
    init_model.main([out, *SMALL, "--seed", "1"])
    before = load_file(f"{out}/model.safetensors")
    with pytest.raises(UserError, match="--force"):
        init_model.main([out, *SMALL, "--seed", "2"])
    assert cli.main(["init-model", out, *SMALL]) == 2
    assert "--force" in capsys.readouterr().err
    assert torch.equal(load_file(f"{out}/model.safetensors")["model.embed_tokens.weight"],
                       before["model.embed_tokens.weight"])
    assert init_model.main([out, *SMALL, "--seed", "2", "--force"]) == 0
    after = load_file(f"{out}/model.safetensors")
    assert not torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize(("args", "match"), [
    (["--heads", "3"], "multiple of heads"),
    (["--kv-heads", "3"], "kv_heads"),
    (["--hidden", "4"], "--hidden"),
])
def test_bad_shapes_are_user_errors(tmp_path, args, match):
    with pytest.raises(UserError, match=match):
        init_model.main([str(tmp_path / "m"), "--hidden", "32", "--heads", "4", *args])
    assert not (tmp_path / "m").exists()
