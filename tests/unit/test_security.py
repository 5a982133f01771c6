"""What docs/reliability.md's security review promises, each as a check that can fail.

- no unpickling of data anywhere in the package (shards are HDF5, checkpoints safetensors
  + JSON, control messages JSON bytes);
- a model directory's own Python (`auto_map` + a modeling file: what `trust_remote_code`
  would run) is never imported, and pickled weights are refused;
- no shell is ever started with a string the config could reach (`shell=True`).
"""

import json
import os
import re

import pytest
from standins import qwen_standin

from hpcalign.errors import UserError
from hpcalign.models.hf import load_model

PACKAGE = os.path.join(os.path.dirname(__file__), "..", "..", "hpcalign")

# What would unpickle or run foreign code: pickle itself, torch.load (pickles unless
# weights_only), numpy's allow_pickle, mpi4py's lowercase object messages (pickles),
# HF's remote code, and shells fed strings.
FORBIDDEN = {
    "pickle module": re.compile(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle)\b"),
    "torch.load": re.compile(r"\btorch\.load\("),
    "allow_pickle": re.compile(r"allow_pickle\s*=\s*True"),
    "trust_remote_code": re.compile(r"trust_remote_code\s*=\s*True"),
    "shell=True": re.compile(r"shell\s*=\s*True"),
    "mpi4py object message": re.compile(
        r"\b(comm|COMM_WORLD|world|self\.comm)\.(send|recv|isend|irecv|bcast|gather|scatter|"
        r"allgather|alltoall|sendrecv)\("),
    "eval/exec": re.compile(r"(?<![.\w])(eval|exec)\("),
}


def _source_lines():
    for directory, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                for number, line in enumerate(open(path, encoding="utf-8"), 1):
                    code = line.split("#", 1)[0]
                    yield os.path.relpath(path, PACKAGE), number, code


def test_no_unpickling_no_remote_code_no_shell_strings_in_the_package():
    hits = [f"{path}:{number}: {what}: {code.strip()}"
            for path, number, code in _source_lines()
            for what, pattern in FORBIDDEN.items() if pattern.search(code)]
    assert not hits, "\n".join(hits)


def test_the_scan_catches_what_it_looks_for():
    """The patterns are not vacuous: each matches the line it exists to catch."""
    samples = {"pickle module": "import pickle", "torch.load": "x = torch.load(path)",
               "allow_pickle": "np.load(p, allow_pickle=True)",
               "trust_remote_code": "AutoModel.from_pretrained(p, trust_remote_code=True)",
               "shell=True": "subprocess.run(cmd, shell=True)",
               "mpi4py object message": "data = comm.recv(source=0)",
               "eval/exec": "eval(text)"}
    assert samples.keys() == FORBIDDEN.keys()
    for what, line in samples.items():
        assert FORBIDDEN[what].search(line), what


def test_model_directory_code_is_never_imported(tmp_path):
    """A model directory that ships its own modeling code (what `trust_remote_code=True`
    would import) loads with transformers' own class, or not at all: its code never runs."""
    model_dir = qwen_standin(tmp_path / "model")
    marker = tmp_path / "remote-code-ran"
    (tmp_path / "model" / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import Qwen2ForCausalLM as EvilForCausalLM\n")
    config_path = tmp_path / "model" / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    config_path.write_text(json.dumps(config))
    try:
        model, _ = load_model(model_dir)
        assert type(model).__name__ == "Qwen2ForCausalLM"
    except UserError:
        pass  # refusing is fine too; running the file is not
    assert not marker.exists()


def test_pickled_weights_are_refused(tmp_path):
    model_dir = qwen_standin(tmp_path / "model")
    os.rename(os.path.join(model_dir, "model.safetensors"),
              os.path.join(model_dir, "pytorch_model.bin"))
    with pytest.raises(UserError, match="pickled .bin checkpoints are refused"):
        load_model(model_dir)
