#!/usr/bin/env python
"""Train or evaluate DINO / CQ-DINO from a LazyConfig.

    python projects/train_net.py --config-file configs/v3det.py --num-gpus 8
    python projects/train_net.py --config-file configs/v3det.py --num-gpus 8 --resume
    python projects/train_net.py --config-file configs/v3det.py --eval-only \\
        train.init_checkpoint=output/v3det/model_final.pth
    python projects/train_net.py --config-file configs/demo.py train.max_iter=100   # overrides

Multi-GPU training runs through detectron2's ``launch`` (DDP, NCCL). Without CUDA,
``--num-gpus N`` runs N CPU processes over gloo. ``train.*`` keys (configs/common/train.py):
``output_dir``, ``init_checkpoint``, ``max_iter``, ``device``, ``seed``, ``amp`` (CUDA only,
bf16/fp16), ``clip_grad``, ``ema``, ``ddp``, ``checkpointer``, ``eval_period``, ``log_period``.
Outputs in ``train.output_dir``: config.yaml, log.txt, metrics.json, TensorBoard events,
``model_*.pth`` (written atomically) and ``last_checkpoint``; ``--resume`` continues from it at
the same iteration, LR, optimizer/scaler/EMA state, RNG state and data position.
"""

import logging
import os
import sys
from contextlib import nullcontext

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import default_argument_parser, default_setup, default_writers, hooks
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from cqdino.data.build import DatasetNotFoundError, check_datasets, dataset_class_names
from cqdino.engine import (
    AtomicCheckpointer,
    ModelEMA,
    PeriodicCheckpointer,
    Trainer,
    format_results,
    inference_on_dataset,
    launch,
    unwrap_model,
)

logger = logging.getLogger("cqdino.train_net")


def _device(cfg) -> torch.device:
    device = cfg.train.get("device", "cuda")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        logger.info("CUDA is not available: running on the CPU")
        return torch.device("cpu")
    return torch.device(device)


def _dataset_names(cfg):
    names = []
    for split in ("train", "test"):
        loader = cfg.dataloader.get(split) if "dataloader" in cfg else None
        dataset = loader.get("dataset") if loader is not None else None
        if dataset is not None and "names" in dataset:
            value = dataset.names
            names += [value] if isinstance(value, str) else list(value)
    return names


def _check_num_classes(cfg, model) -> None:
    """The model's class count must match the training dataset's categories."""
    names = cfg.dataloader.train.dataset.names
    dataset_class_names(names if isinstance(names, str) else names[0], model.class_head.num_classes)


def do_test(cfg, model, ema=None):
    """Evaluate on ``dataloader.test`` with ``dataloader.evaluator`` (EMA weights if enabled)."""
    if "evaluator" not in cfg.dataloader or "test" not in cfg.dataloader:
        return {}
    use_ema = ema is not None and cfg.train.ema.get("eval_with_ema", True)
    with ema.swapped_in(model) if use_ema else nullcontext():
        results = inference_on_dataset(
            unwrap_model(model),
            instantiate(cfg.dataloader.test),
            instantiate(cfg.dataloader.evaluator),
        )
    if comm.is_main_process() and results:
        logger.info(
            "Evaluation results%s:\n%s",
            " (EMA weights)" if use_ema else "",
            format_results(results),
        )
    return results


def _build_ema(cfg, model):
    ema_cfg = cfg.train.get("ema", {})
    return ModelEMA(model, ema_cfg.get("decay", 0.9998)) if ema_cfg.get("enabled", False) else None


def do_train(args, cfg):
    device = _device(cfg)
    model = instantiate(cfg.model).to(device)
    logger.info("Model:\n%s", model)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    _check_num_classes(cfg, model)

    if comm.get_world_size() > 1:
        ddp = cfg.train.get("ddp", {})
        model = DistributedDataParallel(
            model,
            device_ids=[comm.get_local_rank()] if device.type == "cuda" else None,
            broadcast_buffers=ddp.get("broadcast_buffers", False),
            find_unused_parameters=ddp.get("find_unused_parameters", False),
        )
        if ddp.get("fp16_compression", False) and device.type == "cuda":
            from torch.distributed.algorithms.ddp_comm_hooks import default as comm_hooks

            model.register_comm_hook(state=None, hook=comm_hooks.fp16_compress_hook)
    ema = _build_ema(cfg, model)
    amp = cfg.train.get("amp", {})
    clip = cfg.train.get("clip_grad", {})
    trainer = Trainer(
        model,
        train_loader,
        optimizer,
        amp=amp.get("dtype", "bf16") if amp.get("enabled", False) else None,
        clip_grad_norm=clip.get("max_norm", 0.1) if clip.get("enabled", False) else None,
        clip_grad_norm_type=clip.get("norm_type", 2.0),
        ema=ema,
    )
    checkpointer = AtomicCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer),
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model, ema)),
            (
                hooks.PeriodicWriter(
                    default_writers(cfg.train.output_dir, cfg.train.max_iter),
                    period=cfg.train.get("log_period", 20),
                )
                if comm.is_main_process()
                else None
            ),
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    if start_iter >= cfg.train.max_iter:
        logger.info(f"Nothing to do: the checkpoint is at iteration {start_iter} >= max_iter")
        return
    if start_iter:
        logger.info(f"Resuming at iteration {start_iter}")
    trainer.train(start_iter, cfg.train.max_iter)


def do_eval_only(cfg):
    device = _device(cfg)
    model = instantiate(cfg.model).to(device)
    if not cfg.train.init_checkpoint:
        logger.warning("--eval-only without train.init_checkpoint: evaluating untrained weights")
    checkpointer = AtomicCheckpointer(model, cfg.train.output_dir)
    extra = checkpointer.load(cfg.train.init_checkpoint) if cfg.train.init_checkpoint else {}
    ema = None
    ema_state = (extra.get("trainer") or {}).get("ema") if isinstance(extra, dict) else None
    if _build_ema(cfg, model) is not None and ema_state is not None:
        ema = ModelEMA(model, ema_state["decay"])
        ema.load_state_dict(ema_state)
    return do_test(cfg, model, ema)


def main(args):
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    default_setup(cfg, args)
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="cqdino")
    try:
        if args.eval_only:
            return do_eval_only(cfg)
        return do_train(args, cfg)
    except (DatasetNotFoundError, FloatingPointError) as e:
        logger.error(str(e))
        raise SystemExit(1) from None


def preflight(args) -> None:
    """Before starting processes: the config loads and its datasets exist (the synthetic
    vocabulary is generated here, once, rather than by every process)."""
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    check_datasets(_dataset_names(cfg))


def cli(argv=None):
    args = default_argument_parser(
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None
    ).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not os.path.isfile(args.config_file):
        sys.exit(f"--config-file {args.config_file!r}: no such file")
    try:
        preflight(args)
    except DatasetNotFoundError as e:
        sys.exit(f"error: {e}")
    try:
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except torch.multiprocessing.ProcessExitedException as e:
        sys.exit(f"error: a training process failed ({e}); its message is in the log above")


if __name__ == "__main__":
    cli()
