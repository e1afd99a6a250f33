"""One strict loader, one EMA rule, one device rule (issue 31): ``load_weights_strict``
(optionally the checkpoint's EMA weights), ``use_ema_weights`` and ``resolve_device``."""

import pytest
import torch
from omegaconf import OmegaConf

from cqdino.engine import (
    CheckpointError,
    checkpoint_ema_state,
    load_weights_strict,
    resolve_device,
    use_ema_weights,
)


def _cfg(**train):
    return OmegaConf.create({"train": train})


@pytest.mark.parametrize(
    "ema, expected",
    [
        (None, False),  # no train.ema: the model weights
        (dict(enabled=False, eval_with_ema=True), False),
        (dict(enabled=True), True),  # eval_with_ema defaults to true
        (dict(enabled=True, eval_with_ema=True), True),
        (dict(enabled=True, eval_with_ema=False), False),
    ],
)
def test_use_ema_weights(ema, expected):
    cfg = _cfg(ema=ema) if ema is not None else _cfg(device="cpu")
    assert use_ema_weights(cfg) is expected
    assert use_ema_weights(OmegaConf.create({"model": {}})) is False  # no train section


def _checkpoint(tmp_path, with_ema: bool):
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.fill_(3.0)
    ckpt = {"model": model.state_dict(), "iteration": 7}
    if with_ema:
        ema = {"weight": torch.tensor([[10.0, 20.0]]), "bias": torch.tensor([30.0])}
        ckpt["trainer"] = {"ema": {"decay": 0.9, "state": ema}}
    path = tmp_path / ("ema.pth" if with_ema else "plain.pth")
    torch.save(ckpt, path)
    return str(path)


def test_strict_loader_takes_the_ema_weights_only_when_asked_and_present(tmp_path):
    with_ema, plain = _checkpoint(tmp_path, True), _checkpoint(tmp_path, False)
    model = torch.nn.Linear(2, 1)
    extra = load_weights_strict(model, with_ema, use_ema=True)
    assert model.weight.tolist() == [[10.0, 20.0]] and model.bias.tolist() == [30.0]
    assert extra["iteration"] == 7 and checkpoint_ema_state(extra) is not None
    load_weights_strict(model, with_ema)  # use_ema=False: the model weights
    assert model.weight.tolist() == [[1.0, 2.0]] and model.bias.tolist() == [3.0]
    extra = load_weights_strict(model, plain, use_ema=True)  # no EMA saved: model weights
    assert model.weight.tolist() == [[1.0, 2.0]] and checkpoint_ema_state(extra) is None


def test_strict_loader_checks_the_ema_weights_too(tmp_path):
    path = tmp_path / "bad_ema.pth"
    model = torch.nn.Linear(2, 1)
    ema = {"weight": torch.zeros(1, 3), "bias": torch.zeros(1)}
    torch.save({"model": model.state_dict(), "trainer": {"ema": {"state": ema}}}, path)
    with pytest.raises(CheckpointError, match=r"1 of another shape \(weight \[1, 3\] in the file"):
        load_weights_strict(model, str(path), use_ema=True)


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(_cfg(device="cuda")) == torch.device("cpu")
    assert resolve_device(_cfg(device="cuda:1")) == torch.device("cpu")
    assert resolve_device(OmegaConf.create({"model": {}})) == torch.device("cpu")  # default cuda
    assert resolve_device(_cfg(device="cpu")) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(_cfg(device="cuda:1")) == torch.device("cuda", 1)
    assert resolve_device(OmegaConf.create({"train": {}})) == torch.device("cuda")
