"""The training loop: one trainer for CPU and CUDA, fp32 or AMP (bf16/fp16), with gradient
clipping, an optional EMA of the weights, a stop on non-finite losses, and a state that resumes
exactly (optimizer, grad scaler, EMA, RNG states and data-loader position of every rank).

It derives from detectron2's ``TrainerBase`` (hooks, event storage) rather than copying
``SimpleTrainer``/``AMPTrainer``: 0.6's ``AMPTrainer`` requires CUDA and saves no RNG or loader
state, and ``SimpleTrainer``'s private methods changed between detectron2 releases.
"""

import copy
import logging
import random
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional

import numpy as np
import torch
from detectron2.engine import TrainerBase
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cqdino.modeling.dino.heads import STAT_PREFIX
from cqdino.utils.io import InputError

__all__ = ["ModelEMA", "Trainer", "unwrap_model"]

logger = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16}


def unwrap_model(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


class ModelEMA:
    """Exponential moving average of a model's parameters and floating-point buffers:
    ``ema = decay * ema + (1 - decay) * w`` after every step (integer buffers are copied)."""

    def __init__(self, model: nn.Module, decay: float = 0.9998):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema.decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in unwrap_model(model).state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in unwrap_model(model).state_dict().items():
            ema = self.state[k]
            if ema.dtype.is_floating_point:
                ema.lerp_(v.detach().to(ema.dtype), 1.0 - self.decay)
            else:
                ema.copy_(v)

    def state_dict(self) -> Dict[str, Any]:
        return {"decay": self.decay, "state": self.state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = set(self.state) - set(state["state"])
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} entries, e.g. {sorted(missing)[:3]}")
        for k, v in state["state"].items():
            if k in self.state:
                self.state[k].copy_(v)

    class _Swapped:
        def __init__(self, ema: "ModelEMA", model: nn.Module):
            self.ema, self.model = ema, unwrap_model(model)

        def __enter__(self):
            self.saved = copy.deepcopy(self.model.state_dict())
            self.model.load_state_dict(self.ema.state)

        def __exit__(self, *exc):
            self.model.load_state_dict(self.saved)

    def swapped_in(self, model: nn.Module) -> "ModelEMA._Swapped":
        """Context manager: ``model`` holds the EMA weights inside, its own weights after."""
        return ModelEMA._Swapped(self, model)


def _rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # numpy's state as plain types (checkpoints load with weights_only=True)
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *map(float, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _quiet_user_errors(record: logging.LogRecord) -> bool:
    """Logging filter: drop detectron2's "Exception during training" traceback of a user error."""
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, (FloatingPointError, InputError))


class Trainer(TrainerBase):
    """``model(batch) -> dict of losses``, summed, back-propagated, clipped, stepped.

    Args:
        model: the detector (optionally wrapped in DDP).
        data_loader: iterable of batches; if it has ``state_dict``/``load_state_dict`` (see
            :class:`cqdino.data.build.ResumableBatchLoader`) its position is checkpointed.
        optimizer: torch optimizer.
        amp: autocast dtype on CUDA, ``"bf16"`` or ``"fp16"`` (fp16 uses a ``GradScaler``), or
            None for fp32. Ignored (with a warning) on CPU.
        clip_grad_norm: max L2 (``clip_grad_norm_type``) norm of all gradients, None for none.
        ema: optional :class:`ModelEMA`, updated after every optimizer step.
    """

    def __init__(
        self,
        model: nn.Module,
        data_loader: Iterable,
        optimizer: torch.optim.Optimizer,
        *,
        amp: Optional[str] = None,
        clip_grad_norm: Optional[float] = None,
        clip_grad_norm_type: float = 2.0,
        ema: Optional[ModelEMA] = None,
    ):
        super().__init__()
        model.train()
        self.model = model
        self.data_loader = data_loader
        self._data_iter = None  # created at the first step, after a resumed state is loaded
        self.optimizer = optimizer
        device = next(unwrap_model(model).parameters()).device
        if amp is not None and amp not in AMP_DTYPES:
            raise ValueError(f"train.amp.dtype must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
        if amp is not None and device.type != "cuda":
            logger.warning(f"AMP ({amp}) requested on {device.type}: training in fp32")
            amp = None
        self.amp_dtype = AMP_DTYPES[amp] if amp else None
        self.device_type = device.type
        self.grad_scaler = torch.amp.GradScaler("cuda") if self.amp_dtype is torch.float16 else None
        self.clip_grad_norm = clip_grad_norm
        self.clip_grad_norm_type = clip_grad_norm_type
        self.ema = ema

    def train(self, start_iter: int, max_iter: int) -> None:
        """``TrainerBase.train``, except that an error whose message is the whole story (a
        non-finite loss, a checkpoint that cannot be written: ``FloatingPointError``,
        :class:`~cqdino.utils.io.InputError`) is not logged with a traceback on its way out;
        the entry point reports it in one line."""
        log = logging.getLogger("detectron2.engine.train_loop")
        log.addFilter(_quiet_user_errors)
        try:
            super().train(start_iter, max_iter)
        finally:
            log.removeFilter(_quiet_user_errors)

    def run_step(self) -> None:
        if self._data_iter is None:
            self._data_iter = iter(self.data_loader)
        start = time.perf_counter()
        data = next(self._data_iter)
        data_time = time.perf_counter() - start

        try:
            with torch.autocast(
                self.device_type,
                dtype=self.amp_dtype or torch.float32,
                enabled=bool(self.amp_dtype),
            ):
                loss_dict = self.model(data)
        except FloatingPointError as e:  # raised inside the model (e.g. the matcher's costs)
            raise FloatingPointError(
                f"Non-finite values at iteration {self.iter}: {e}. Training stopped; lower the "
                "learning rate, check the data, or enable gradient clipping."
            ) from None
        if isinstance(loss_dict, torch.Tensor):
            loss_dict = {"total_loss": loss_dict}
        losses = sum(v for k, v in loss_dict.items() if not k.startswith(STAT_PREFIX))

        self.optimizer.zero_grad(set_to_none=True)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(losses).backward()
            self.grad_scaler.unscale_(self.optimizer)
        else:
            losses.backward()
        grad_norm = None
        if self.clip_grad_norm is not None:
            params = [p for p in self.model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, self.clip_grad_norm, self.clip_grad_norm_type
            )
        self.write_metrics(loss_dict, data_time, grad_norm)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)

    def write_metrics(
        self,
        loss_dict: Mapping[str, torch.Tensor],
        data_time: float,
        grad_norm: Optional[torch.Tensor] = None,
    ) -> None:
        """Put the losses (mean over ranks) into the event storage; raise ``FloatingPointError``
        naming the non-finite losses and the iteration on every rank."""
        names = list(loss_dict)
        values = [loss_dict[k].detach().float().reshape(()) for k in names]
        if grad_norm is not None:
            names.append("grad_norm")
            values.append(grad_norm.detach().float().reshape(()))
        # one device-to-host transfer for all the scalars of the step
        metrics = dict(zip(names, torch.stack(values).cpu().tolist()))
        metrics["data_time"] = data_time
        all_metrics: List[Dict[str, float]] = comm.all_gather(metrics)
        bad = sorted(
            {
                k
                for m in all_metrics
                for k, v in m.items()
                if k != "grad_norm" and not np.isfinite(v)
            }
        )
        if bad:
            values = ", ".join(f"{k}={[m[k] for m in all_metrics]}" for k in bad)
            raise FloatingPointError(
                f"Non-finite loss at iteration {self.iter}: {values} (per rank). Training stopped;"
                " lower the learning rate, check the data, or enable gradient clipping."
            )
        if not comm.is_main_process():
            return
        storage = get_event_storage()
        storage.put_scalar("data_time", max(m["data_time"] for m in all_metrics))
        mean = {k: float(np.mean([m[k] for m in all_metrics])) for k in loss_dict}
        # Raw per-iteration values in metrics.json / TensorBoard (repeatable across resumes);
        # the console log still shows detectron2's 20-iteration medians of the losses.
        total = sum(v for k, v in mean.items() if not k.startswith(STAT_PREFIX))
        storage.put_scalar("total_loss", total, smoothing_hint=False)
        if grad_norm is not None:
            storage.put_scalar("grad_norm", float(np.mean([m["grad_norm"] for m in all_metrics])))
        if self.grad_scaler is not None:
            storage.put_scalar("grad_scale", self.grad_scaler.get_scale())
        storage.put_scalars(**mean, smoothing_hint=False)

    # ------------------------------------------------------------------ state
    def rank_state(self) -> Dict[str, Any]:
        """This rank's part of the state: RNGs and the data-loader position."""
        state = {"rng": _rng_state()}
        if hasattr(self.data_loader, "state_dict"):
            state["data_loader"] = self.data_loader.state_dict()
        return state

    def state_dict(self) -> Dict[str, Any]:
        """Hooks' and optimizer state (detectron2's layout), grad scaler, EMA, and the
        per-rank states gathered by the checkpointer into ``ranks`` (see
        :class:`cqdino.engine.checkpoint.AtomicCheckpointer`)."""
        state = super().state_dict()
        state["optimizer"] = self.optimizer.state_dict()
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        state["ranks"] = getattr(self, "_gathered_rank_states", [self.rank_state()])
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.grad_scaler is not None and "grad_scaler" in state:
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        if self.ema is not None:
            if "ema" in state:
                self.ema.load_state_dict(state["ema"])
            else:
                logger.warning("EMA enabled but the checkpoint has no EMA state: EMA restarts")
        ranks = state.get("ranks", [])
        rank, world = comm.get_rank(), comm.get_world_size()
        if len(ranks) != world:
            logger.warning(
                f"The checkpoint holds {len(ranks)} rank states for {world} processes: RNG and "
                "data-loader positions are not restored exactly (the sampler restarts at the "
                "first rank's position)"
            )
            if ranks and "data_loader" in ranks[0] and hasattr(self.data_loader, "state_dict"):
                self.data_loader.load_state_dict({**ranks[0]["data_loader"], "pending": [[], []]})
            return
        mine = ranks[rank]
        _set_rng_state(mine["rng"])
        if "data_loader" in mine and hasattr(self.data_loader, "load_state_dict"):
            self.data_loader.load_state_dict(mine["data_loader"])
