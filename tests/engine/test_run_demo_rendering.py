"""tools/run_demo.py evaluates the second rendering with the intra-op threads of one training
process (cores / processes) and gives the process its thread count back afterwards."""

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load_run_demo():
    spec = importlib.util.spec_from_file_location("run_demo", ROOT / "tools" / "run_demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("cores, processes, expected", [(2, 2, 1), (16, 2, 8), (1, 2, 1)])
def test_rendering_eval_threads(monkeypatch, tmp_path, cores, processes, expected):
    import detectron2.config

    import cqdino.engine

    run_demo = _load_run_demo()
    seen = {}

    class Model:
        def eval(self):
            return self

    def fake_inference(model, loader, evaluator):
        seen["threads"] = torch.get_num_threads()
        return {"bbox": {"AP": 12.5}}

    monkeypatch.setattr(detectron2.config, "instantiate", lambda cfg: Model())
    monkeypatch.setattr(cqdino.engine, "load_weights_strict", lambda model, path: {})
    monkeypatch.setattr(cqdino.engine, "inference_on_dataset", fake_inference)
    monkeypatch.setattr(run_demo.os, "cpu_count", lambda: cores)
    before = torch.get_num_threads()
    try:
        out = run_demo.evaluate_rendering(tmp_path, [], processes)
        assert seen["threads"] == expected
        assert out == {"bbox/AP": 12.5}
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)
