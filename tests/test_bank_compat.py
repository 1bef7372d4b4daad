"""Banks saved by earlier versions keep loading and answering the same.

`tests/fixtures/bank_0_1_0/` was saved by peft-asr 0.1.0 at commit 025eff0 (before the package layout changes)
from `conftest.two_task_model()`; `expected.json` holds what that code answered for six held-out prompts: the
routes, the router scores and the sum of each row's logits. Any change to the file format, the key mapping, the
router or the routed forward that alters an old bank's answers fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import left_pad, tiny_llama
from peft import PeftModel

import peft_asr  # noqa: F401

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "bank_0_1_0"


def test_a_bank_saved_by_0_1_0_loads_routes_and_answers_the_same(tmp_path):
    expected = json.loads((FIXTURE / "expected.json").read_text())
    model = PeftModel.from_pretrained(tiny_llama(), FIXTURE).eval()
    assert model.tasks == ["alpha", "beta"]
    assert model.base_model.router.class_counts.tolist() == expected["class_counts"]
    batch = left_pad(expected["rows"])
    assert model.route(**batch) == expected["routes"]
    assert torch.allclose(model.route_scores(**batch), torch.tensor(expected["scores"], dtype=torch.float64),
                          atol=1e-9)
    with torch.no_grad():
        logits = model(**batch).logits
    real = batch["attention_mask"].bool()
    sums = [float(logits[i][real[i]].double().sum()) for i in range(len(expected["rows"]))]
    assert torch.allclose(torch.tensor(sums), torch.tensor(expected["logit_sums"]), rtol=1e-5, atol=1e-4)
    # and it keeps learning: the statistics came along, so a new save reloads to the same router
    model.save_pretrained(tmp_path / "again")
    again = PeftModel.from_pretrained(tiny_llama(), tmp_path / "again")
    assert torch.equal(again.base_model.router.weight, model.base_model.router.weight)
