"""`stylora costs`: the resource records the trainers write, as a table; any other JSON refused by name."""

from __future__ import annotations

import json

import pytest
from stylora.cli import main

RECORD = {"artifact": "monet.safetensors", "bytes": 3_000_000, "kind": "lora", "steps": 100, "train_seconds": 120.0,
          "loop_seconds": 50.0, "resumed_from": 0, "peak_memory_mb": 2048.0, "device": "cuda:0"}


def test_costs_prints_a_row_per_record(tmp_path, capsys):
    path = tmp_path / "monet.resources.json"
    path.write_text(json.dumps(RECORD))
    assert main(["costs", str(path), "--out", str(tmp_path / "costs.md")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2] == "| monet.safetensors | lora | 100 | 2.0 min | 0.50 | 2048 MB | 3.0 MB | cuda:0 |"
    assert (tmp_path / "costs.md").read_text().startswith("# Training cost\n\n| artifact |")


@pytest.mark.parametrize(("content", "said"), [
    ([RECORD], "got a JSON list"),
    ({"loss": [1, 2]}, "missing or mistyped artifact, kind, steps, train_seconds, peak_memory_mb, device"),
    ({**RECORD, "steps": "100"}, "missing or mistyped steps;"),
    ({**RECORD, "train_seconds": True}, "missing or mistyped train_seconds;"),
    ({k: v for k, v in RECORD.items() if k != "device"}, "missing or mistyped device;"),
])
def test_costs_refuses_a_json_of_another_shape_naming_the_file_and_the_shape(tmp_path, capsys, content, said):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(content))
    assert main(["costs", str(path)]) == 2
    err = capsys.readouterr()
    assert "?" not in err.out and err.out == ""
    assert f"stylora: error: {path}: not a resource record: {said}" in err.err
    assert "expected a JSON object with the keys artifact (text), kind (text), steps (number), train_seconds " \
           "(number), peak_memory_mb (number), device (text)" in err.err
