"""benchmarks/flops.py: the per-part attribution of one forward's FLOPs adds up to torch's
total, each part without sub-parts equals torch's own count of that module, and the command
prints its table and writes its JSON."""

import json

import pytest
import torch

from cqdino import _ext
from tests.helpers import load_script

pytestmark = pytest.mark.skipif(not _ext.has_ext(), reason="counts the compiled op's formula")


def test_parts_add_up_and_match_torchs_module_counts(tmp_path, capsys):
    from torch.utils.flop_counter import FlopCounterMode

    bench = load_script("benchmarks/flops.py", "flops_benchmark")
    model = bench._build("demo", "cpu")
    images = bench._inputs("demo", model.size_divisibility, "cpu")[0]
    res = bench.count(model, images)
    assert sum(res["parts"].values()) == res["total"] == sum(res["ops"].values())
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model([{"image": im} for im in images])
    counts = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
    assert res["total"] == counts["Global"]
    # parts with no listed part below them: the module's own count
    for part in ("backbone", "neck", "transformer.encoder", "transformer.decoder"):
        assert res["parts"][part] == counts[f"CQDINO.{part}"] > 0, part
    assert res["parts"]["class_head.selector"] == counts["CQDINO.class_head.selector"] > 0
    assert res["ops"]["ms_deform_attn_forward"] > 0  # the compiled op has its formula

    out = tmp_path / "flops.json"
    assert bench.main(["--presets", "demo", "--repeats", "1", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["presets"]["demo"]["total"] == res["total"]
    assert rec["gemm"]["gflops"] > 0 and rec["presets"]["demo"]["floor_s"] > 0
    assert "transformer.encoder" in capsys.readouterr().out
