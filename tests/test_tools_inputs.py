"""Bad inputs to the offline tools fail naming the file and what was expected."""

from __future__ import annotations

import re

import pytest
import tiny_llama as tl

from sparse24_tools.evaluate import EvalError, load_for_eval
from vllm_sparse24.checkpoint import CheckpointError


@pytest.mark.parametrize("kind", ["dense", "sparse24"])
def test_eval_of_a_truncated_safetensors_names_the_file(tmp_path, kind):
    dense = tmp_path / "dense"
    model = tl.build_dense(dense, hidden=128, intermediate=256, layers=1)
    model.save_pretrained(dense)
    folder = dense
    if kind == "sparse24":
        folder = tmp_path / "sparse24"
        tl.write_checkpoint(model, dense, folder)
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises((CheckpointError, EvalError), match=re.escape(str(f)) + ".*corrupt or truncated"):
        load_for_eval(folder)
