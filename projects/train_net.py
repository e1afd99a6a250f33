#!/usr/bin/env python
"""Train or evaluate DINO / CQ-DINO from a LazyConfig.

    python projects/train_net.py --config-file configs/v3det.py --num-gpus 8
    python projects/train_net.py --config-file configs/v3det.py --num-gpus 8 --resume
    python projects/train_net.py --config-file configs/v3det.py --eval-only \\
        train.init_checkpoint=output/v3det/model_final.pth
    python projects/train_net.py --config-file configs/demo.py train.max_iter=100 \\
        train.output_dir=output/demo_short                                        # overrides

Multi-GPU training runs through detectron2's ``launch`` (DDP, NCCL). Without CUDA,
``--num-gpus N`` runs N CPU processes over gloo. Started by ``torchrun`` or ``srun`` (one
process per GPU, several nodes), it takes its rank from their variables and starts no process
(README, "Training on several machines"; cqdino/engine/launch.py).
``train.*`` keys (configs/common/train.py):
``output_dir``, ``init_checkpoint``, ``max_iter``, ``device``, ``seed``, ``amp`` (CUDA only,
bf16/fp16), ``clip_grad``, ``ema``, ``ddp``, ``checkpointer``, ``eval_period``, ``log_period``.
Outputs in ``train.output_dir``: config.yaml, log.txt, metrics.json, TensorBoard events,
``model_*.pth`` (written atomically) and ``last_checkpoint``; ``--resume`` continues from it at
the same iteration, LR, optimizer/scaler/EMA state, RNG state and data position.

Nothing is lost and nothing is silently wrong: an override must name a key the config has (or an
argument of its callable), values are checked before the model is built, a folder that already
holds a run is refused unless ``--resume`` (continue it) or ``--overwrite`` (replace it) is
given, a folder in use by another live run is refused (``run.lock``), ``--resume`` needs the
run's own config (see ``RESUME_MAY_DIFFER`` in cqdino/engine/config_check.py), a checkpoint of
another vocabulary is refused unless ``--allow-other-vocabulary``, ``--eval-only`` into a run's
folder writes to a new ``eval/<N>/``, evaluation loads checkpoints strictly, and every such error
is one line.
"""

import argparse
import glob
import json
import logging
import os
import re
import sys
from contextlib import nullcontext
from typing import List, Optional

from cqdino.utils import quiet_imports  # noqa: F401  (before detectron2: see its docstring)

# isort: split

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import default_argument_parser, default_writers, hooks
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel

from cqdino.data.build import (
    DatasetNotFoundError,
    check_datasets,
    dataset_class_names,
    register_config_datasets,
    resolve_seed,
)
from cqdino.data.datasets import check_config_categories
from cqdino.data.mapper import RecordError
from cqdino.engine import (
    AtomicCheckpointer,
    ModelEMA,
    PeriodicCheckpointer,
    Trainer,
    atomic_write,
    check_resumable,
    checkpoint_ema_state,
    format_results,
    inference_on_dataset,
    launch,
    load_weights_strict,
    resolve_device,
    unwrap_model,
    use_ema_weights,
)
from cqdino.engine.checkpoint import (
    check_vocabulary,
    read_checkpoint_meta,
    resume_checkpoint_file,
    tree_sha256,
)
from cqdino.engine.config_check import (
    config_differences,
    config_num_classes,
    load_config,
    validate_config,
)
from cqdino.engine.launch import LAUNCHERS, TIMEOUT_ENV, dist_timeout
from cqdino.engine.run_lock import RunLock
from cqdino.evaluation.build import check_evaluator_config
from cqdino.utils.cli import options_first
from cqdino.utils.io import InputError, atomic_save, check_output_dir

logger = logging.getLogger("cqdino.train_net")


def _dataset_names(cfg):
    names = []
    for split in ("train", "test"):
        loader = cfg.dataloader.get(split) if "dataloader" in cfg else None
        dataset = loader.get("dataset") if loader is not None else None
        if dataset is not None and "names" in dataset:
            value = dataset.names
            names += [value] if isinstance(value, str) else list(value)
    return names


def _check_num_classes(cfg, model) -> Optional[List[str]]:
    """The model's class count must match the training dataset's categories; returns the
    dataset's class names (None when its metadata has none)."""
    names = cfg.dataloader.train.dataset.names
    return dataset_class_names(
        names if isinstance(names, str) else names[0], model.class_head.num_classes
    )


def _check_class_counts(cfg) -> None:
    """Before building anything: the model's class count (``model.class_head.*``), the
    mappers' ``num_classes`` and the registered datasets' categories agree."""
    num = config_num_classes(cfg)
    if num is None:
        return
    for split in ("train", "test"):
        key = f"dataloader.{split}.mapper.num_classes"
        loader = cfg.dataloader.get(split) if "dataloader" in cfg else None
        mapper = loader.get("mapper") if loader is not None else None
        if mapper is None or "num_classes" not in mapper:
            continue  # no such mapper (or one without a class count)
        try:
            value = mapper.num_classes
        except Exception as e:  # e.g. an interpolation naming a key that does not exist
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"{key}: cannot be resolved ({first})") from None
        if not isinstance(value, int) or isinstance(value, bool):
            raise InputError(f"{key} must be an integer, got {value!r}")
        if value != num:
            raise InputError(
                f"{key}={value} but the model has {num} classes "
                "(model.class_head.num_categories / num_classes): set both to the same value"
            )
    from detectron2.data import DatasetCatalog

    for name in _dataset_names(cfg):
        if name in DatasetCatalog.list():
            dataset_class_names(name, num)


# Files that mark a folder as holding a run (train_net writes them; log.txt and config.yaml
# alone are what a run that stopped at an error leaves).
_RUN_FILES = ("last_checkpoint", "metrics.json", "model_final.pth")


def _has_rows(path: str) -> bool:
    """``metrics.json`` holds at least one complete record (a run that stopped before its first
    row leaves an empty file: not a run to protect)."""
    try:
        with open(path) as f:
            for line in f:
                try:
                    if isinstance(json.loads(line), dict):
                        return True
                except ValueError:
                    continue
    except OSError:
        return False
    return False


def _existing_run(output_dir: str) -> List[str]:
    """The files that make ``output_dir`` hold a run (empty when it holds none)."""
    found = [
        f
        for f in _RUN_FILES
        if os.path.isfile(os.path.join(output_dir, f))
        and (f != "metrics.json" or _has_rows(os.path.join(output_dir, f)))
    ]
    found += sorted(
        os.path.basename(p) for p in glob.glob(os.path.join(output_dir, "model_[0-9]*.pth"))
    )
    return found


def _drop_metrics_from(output_dir: str, start_iter: int) -> None:
    """Resuming at ``start_iter``: drop the training rows of iterations >= ``start_iter`` from
    metrics.json (a run interrupted after its last checkpoint, e.g. by Ctrl-C, wrote them; they
    are computed again), so every iteration has one row."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        it = rec.get("iteration", -1) if isinstance(rec, dict) else -1
        # kept: earlier iterations, and the final evaluation of the run resumed from (logged
        # at iteration max_iter = start_iter, without training losses)
        if it < start_iter or (it == start_iter and "total_loss" not in rec):
            keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
        atomic_write(path, lambda f: f.writelines(keep), mode="w")
        logger.info(
            f"metrics.json: dropped {len(lines) - len(keep)} rows of iterations >= {start_iter}"
        )


def do_test(cfg, model, ema=None, ema_weights: bool = False):
    """Evaluate on ``dataloader.test`` with ``dataloader.evaluator``: with the weights of
    ``ema`` swapped in when :func:`~cqdino.engine.checkpoint.use_ema_weights` (during
    training); ``ema_weights``: the model already holds EMA weights (logged as such)."""
    if "evaluator" not in cfg.dataloader or "test" not in cfg.dataloader:
        return {}
    use_ema = ema is not None and use_ema_weights(cfg)
    with ema.swapped_in(model) if use_ema else nullcontext():
        results = inference_on_dataset(
            unwrap_model(model),
            instantiate(cfg.dataloader.test),
            instantiate(cfg.dataloader.evaluator),
        )
    if comm.is_main_process() and results:
        logger.info(
            "Evaluation results%s:\n%s",
            " (EMA weights)" if use_ema or ema_weights else "",
            format_results(results),
        )
    return results


def _build_ema(cfg, model):
    ema_cfg = cfg.train.get("ema", {})
    return ModelEMA(model, ema_cfg.get("decay", 0.9998)) if ema_cfg.get("enabled", False) else None


def do_train(args, cfg):
    device = resolve_device(cfg)
    model = instantiate(cfg.model).to(device)
    logger.info("Model:\n%s", model)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    class_names = _check_num_classes(cfg, model)

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
    # the vocabulary travels with the weights (projects/demo.py names detections from the
    # class names; a later run with another vocabulary is stopped: see preflight)
    extra = {"class_names": class_names} if class_names is not None else {}
    tree = _vocabulary(cfg)[2]
    if tree is not None:
        extra["category_tree_sha256"] = tree
    checkpointer = AtomicCheckpointer(model, cfg.train.output_dir, extra=extra, trainer=trainer)
    writers = []  # filled after resuming (metrics.json is trimmed first)
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer),
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model, ema)),
            (
                hooks.PeriodicWriter(writers, period=cfg.train.get("log_period", 20))
                if comm.is_main_process()
                else None
            ),
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    if comm.is_main_process():
        if args.resume:  # rows of iterations computed again (all of them without a checkpoint)
            _drop_metrics_from(cfg.train.output_dir, start_iter)
        writers.extend(default_writers(cfg.train.output_dir, cfg.train.max_iter))
    if start_iter >= cfg.train.max_iter:
        logger.info(f"Nothing to do: the checkpoint is at iteration {start_iter} >= max_iter")
        return
    if start_iter:
        logger.info(f"Resuming at iteration {start_iter}")
    trainer.train(start_iter, cfg.train.max_iter)


def do_eval_only(cfg, args=None):
    device = resolve_device(cfg)
    model = instantiate(cfg.model)
    if not cfg.train.init_checkpoint:
        logger.warning("--eval-only without train.init_checkpoint: evaluating untrained weights")
    else:
        how = (
            "the run's last checkpoint (--resume)"
            if args is not None and args.resume
            else "train.init_checkpoint"
        )
        logger.info(f"Evaluating {cfg.train.init_checkpoint} ({how})")
    # strict: every tensor of the model, of the same shape (a checkpoint of another config is
    # an error, not an AP table of a half-initialised model)
    use_ema = use_ema_weights(cfg)
    extra = (
        load_weights_strict(model, cfg.train.init_checkpoint, use_ema=use_ema)
        if cfg.train.init_checkpoint
        else {}
    )
    ema_loaded = use_ema and checkpoint_ema_state(extra) is not None
    if cfg.train.init_checkpoint:
        logger.info(
            f"Loaded {cfg.train.init_checkpoint} (all {len(model.state_dict())} tensors"
            + (", its EMA weights: train.ema.enabled)" if ema_loaded else ")")
        )
    model.to(device)
    return do_test(cfg, model, ema_weights=ema_loaded)


def setup(cfg, args) -> None:
    """detectron2's ``default_setup`` without its side effects on the run folder: loggers
    (``log.txt`` without colour codes), the environment (``python -m cqdino.env``, which does
    not import ``torch.utils.cpp_extension`` and its CUDA_HOME guess), the config saved
    atomically as ``config.yaml`` (``--eval-only`` into a run's folder writes
    ``config_eval.yaml`` and leaves the run's own config alone), and the seeds."""
    from cqdino.env import collect_env

    output_dir = cfg.train.output_dir
    rank = comm.get_rank()
    if comm.is_main_process():
        os.makedirs(output_dir, exist_ok=True)
    for name in ("fvcore", "detectron2", "cqdino"):
        setup_logger(output_dir, distributed_rank=rank, name=name)
    logger.info(f"Rank of current process: {rank}. World size: {comm.get_world_size()}")
    logger.info("Environment:\n" + "\n".join(f"{k:<20} {v}" for k, v in collect_env()))
    logger.info(f"Command line arguments: {args}")
    with open(args.config_file) as f:
        logger.info(f"Contents of {args.config_file}:\n{f.read()}")
    seed = _resolve_run_seed(cfg, args)
    if comm.is_main_process():
        path = os.path.join(output_dir, "config.yaml")
        if args.eval_only and os.path.exists(path):
            path = os.path.join(output_dir, "config_eval.yaml")
        atomic_save(path, lambda tmp: LazyConfig.save(cfg, tmp))
        logger.info(f"Full config saved to {path}")
    seed_all_rng(seed + rank)


def _resolve_run_seed(cfg, args) -> int:
    """``train.seed`` of this run, made concrete before ``config.yaml`` is written (detectron2's
    convention: ``-1`` is a fresh random seed, logged and saved so the run can be repeated).

    A resumed run keeps the seed its ``config.yaml`` recorded (the data stream and augmentation
    continue where they stopped); otherwise ``-1`` draws one seed shared by all ranks. The
    loader's ``seed="${train.seed}"`` follows, so model, sampler and augmentation share it."""
    seed = cfg.train.get("seed", -1)
    seed = -1 if seed is None else int(seed)
    saved = os.path.join(cfg.train.output_dir, "config.yaml")
    if seed < 0 and args.resume and os.path.isfile(saved):
        previous = LazyConfig.load(saved).train.get("seed", -1)
        if previous is not None and int(previous) >= 0:
            seed = int(previous)
            logger.info(f"train.seed=-1 on --resume: continuing with the run's seed {seed}")
    if seed < 0:
        seed = resolve_seed(None)
        logger.info(f"train.seed=-1: drew the random seed {seed} (saved in config.yaml)")
    cfg.train.seed = seed
    return seed


# Errors a user can fix from the message alone: logged as one line, exit status 1.
USER_ERRORS = (DatasetNotFoundError, FloatingPointError, InputError, RecordError)


def main(args):
    cfg = load_config(args.config_file, args.opts)
    if args.eval_only:  # chosen once by preflight (a sub-folder of a run's folder, ...)
        if getattr(args, "eval_output_dir", None):
            cfg.train.output_dir = args.eval_output_dir
        if getattr(args, "eval_checkpoint", None) is not None:
            cfg.train.init_checkpoint = args.eval_checkpoint
    setup(cfg, args)
    try:
        register_config_datasets(cfg)  # in every process
        if args.eval_only:
            return do_eval_only(cfg, args)
        return do_train(args, cfg)
    except USER_ERRORS as e:
        logger.error(str(e))
        raise SystemExit(1) from None


def _check_world_size(cfg, args) -> None:
    """The training batch splits evenly over the processes (checked before any is started)."""
    world = max(int(args.num_gpus), 1) * max(int(getattr(args, "num_machines", 1)), 1)
    how = f"--num-gpus {args.num_gpus} x --num-machines {getattr(args, 'num_machines', 1)}"
    if comm.get_world_size() > world:  # torchrun / srun: rank 0 checks in the formed group
        world, how = comm.get_world_size(), "started by the launcher"
    loader = cfg.dataloader.get("train") if "dataloader" in cfg else None
    total = loader.get("total_batch_size") if loader is not None else None
    if isinstance(total, int) and world > 1 and total % world:
        raise InputError(
            f"dataloader.train.total_batch_size={total} is not a multiple of the {world} "
            f"processes ({how}): each process takes an equal share; set it "
            f"to a multiple of {world}, e.g. {max(world, total - total % world)}"
        )


def _check_resume_config(cfg, out: str) -> None:
    """``--resume``: the config must be the run's own (its ``config.yaml``), up to the keys of
    :data:`~cqdino.engine.config_check.RESUME_MAY_DIFFER`; checked before anything is
    written."""
    saved = os.path.join(out, "config.yaml")
    if not os.path.isfile(saved):
        logger.warning(f"--resume: {out} has no config.yaml to compare the config with")
        return
    diffs = config_differences(cfg, saved)
    if diffs:

        def short(v):
            text = repr(v)
            return text if len(text) <= 40 else text[:37] + "..."

        shown = ", ".join(f"{k} ({short(a)} -> {short(b)})" for k, a, b in diffs[:5])
        more = f" and {len(diffs) - 5} more" if len(diffs) > 5 else ""
        raise InputError(
            f"--resume: the config differs from the run's {saved} in {shown}{more}: resume "
            "with the run's config and overrides, or start a new run (another "
            "train.output_dir=..., with train.init_checkpoint=... to start from its weights)"
        )


def _vocabulary(cfg):
    """(dataset name, class names, tree digest) of the vocabulary this config builds its model
    from: the first training dataset's class names and the tree of ``model.class_head``."""
    names = cfg.dataloader.train.dataset.names
    name = names if isinstance(names, str) else list(names)[0]
    num = config_num_classes(cfg)
    head = cfg.model.get("class_head") if "model" in cfg else None
    if num is None and head is not None:
        node = head.get("num_categories", head.get("num_classes"))
        num = instantiate(node) if isinstance(node, DictConfig) and "_target_" in node else None
    class_names = dataset_class_names(name, num) if isinstance(num, int) else None
    tree = head.get("tree_file") if head is not None else None
    if isinstance(tree, DictConfig) and "_target_" in tree:
        tree = instantiate(tree)
    return name, class_names, tree_sha256(tree) if tree else None


def _check_checkpoint_vocabulary(cfg, args, checkpoint: Optional[str], what: str) -> None:
    meta = read_checkpoint_meta(checkpoint) if checkpoint else {}
    if not meta.get("class_names") and not meta.get("category_tree_sha256"):
        return  # nothing to compare (e.g. a pretrained backbone)
    dataset, names, tree = _vocabulary(cfg)
    check_vocabulary(
        meta,
        names,
        tree,
        what=what,
        dataset=dataset,
        allow=getattr(args, "allow_other_vocabulary", False),
    )


def _eval_output_dir(out: str) -> str:
    """``--eval-only``: where the results go. A folder that holds a run (or earlier results)
    gets a new ``eval/<N>`` inside it, so nothing of the run (``inference/``, ``config.yaml``,
    ``log.txt``, ``metrics.json``) is replaced; a new or empty folder is used as it is."""
    marks = ("config.yaml", "log.txt", "inference")
    if not os.path.isdir(out) or not (
        _existing_run(out) or any(os.path.exists(os.path.join(out, m)) for m in marks)
    ):
        return out
    os.makedirs(os.path.join(out, "eval"), exist_ok=True)
    n = 1
    while True:
        path = os.path.join(out, "eval", str(n))
        try:
            os.mkdir(path)  # atomic: two evaluations started at once get two folders
            return path
        except FileExistsError:
            n += 1


# The lock of the run this process prepared (held until the process exits or prepares another).
_RUN_LOCK: List[RunLock] = []


def _lock(folder: str) -> RunLock:
    """Lock ``folder`` for this run (one line if another live run holds it), saying whose
    lock it takes over when a killed run left one."""
    lock = RunLock(folder).acquire()
    if lock.previous:
        logger.warning(
            f"{lock.path}: the run that held it ({lock.previous}) ended without releasing it "
            "(killed?); this run takes it over"
        )
    return lock


def _hold(lock: RunLock) -> None:
    while _RUN_LOCK:  # a previous run of this process (a test calling cli() twice) has ended
        _RUN_LOCK.pop().release()
    _RUN_LOCK.append(lock)


def _remove_old_run(out: str) -> None:
    """``--overwrite``: the replaced run's checkpoints, ``last_checkpoint``, ``metrics.json``
    and TensorBoard events go (the new run's files are not mixed with the old ones); its
    ``log.txt`` is appended to, other files stay."""
    names = ["last_checkpoint", "metrics.json"]
    names += [f for f in os.listdir(out) if re.match(r"^model_(\d+|final)\.pth$", f)]
    names += [f for f in os.listdir(out) if f.startswith("events.out.tfevents.")]
    for name in names:
        if os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    logger.warning(f"--overwrite: replacing the run in {out} (removed {len(names)} files)")


def preflight(args) -> None:
    """Before starting processes and building anything, each problem one line: the config and
    its overrides (keys and values), the output folder (writable; not in use by another run;
    not a previous run unless ``--resume`` or ``--overwrite``; on ``--resume`` the run's own
    config), the batch split over the processes, the checkpoints named and their vocabulary,
    the datasets (the synthetic vocabulary is generated here, once, rather than by every
    process) and the class counts. Then the output folder is locked for the run's life
    (``run.lock``), and ``--eval-only`` into a run's folder gets its own ``eval/<N>``."""
    cfg = load_config(args.config_file, args.opts)
    validate_config(cfg)
    out = cfg.train.output_dir
    check_output_dir(out, "train.output_dir")
    if args.eval_only and args.overwrite:
        raise InputError("--overwrite is for training; --eval-only writes no checkpoint")
    if not args.eval_only:
        _check_world_size(cfg, args)
    # a folder in use by a live run is refused first (and locked before anything is removed)
    lock = _lock(out) if os.path.isdir(out) and not args.eval_only else None
    try:
        run = _existing_run(out) if os.path.isdir(out) else []
        last = resume_checkpoint_file(out) if args.resume and os.path.isdir(out) else None
        resuming = last is not None and not args.eval_only
        replace = bool(run) and not (args.resume or args.eval_only)
        if replace and not args.overwrite:
            raise InputError(
                f"train.output_dir={out} already holds a run ({', '.join(run[:4])}): add "
                "--resume to continue it, choose another train.output_dir=..., or add "
                "--overwrite to replace it"
            )
        if last is not None:
            check_resumable(out)
        if resuming:
            _check_resume_config(cfg, out)
        init = cfg.train.init_checkpoint
        if init and not last and not os.path.isfile(init):
            raise InputError(f"train.init_checkpoint={init}: no such file")
        register_config_datasets(cfg)
        check_datasets(_dataset_names(cfg))
        check_config_categories(cfg)  # a val json with the training json's categories
        _check_class_counts(cfg)
        check_evaluator_config(cfg)  # the evaluator's arguments fit the test dataset's type
        if last is not None:
            what = f"--resume: the checkpoint {last}"
            _check_checkpoint_vocabulary(cfg, args, last, what)
        elif init:
            _check_checkpoint_vocabulary(cfg, args, init, f"train.init_checkpoint={init}")
        if args.eval_only:
            # --eval-only --resume evaluates the run's last checkpoint (detectron2's rule)
            args.eval_checkpoint = last if last is not None else init
            args.eval_output_dir = _eval_output_dir(out)
            lock = _lock(args.eval_output_dir)
        elif lock is None:
            lock = _lock(out)  # creates the folder: every check has passed
        if replace:  # every check passed: only now is anything of the old run removed
            _remove_old_run(out)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    _hold(lock)


def _options_first(parser: argparse.ArgumentParser, argv: List[str]) -> List[str]:
    """``... key=value --resume``: the overrides moved behind the options
    (:func:`cqdino.utils.cli.options_first`)."""
    return options_first(parser, argv)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = default_argument_parser(epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="train into a train.output_dir that holds a previous run, replacing it",
    )
    parser.add_argument(
        "--allow-other-vocabulary",
        action="store_true",
        help="use a checkpoint trained on other class names or another category tree (a "
        "warning instead of an error; e.g. to fine-tune on a new vocabulary)",
    )
    parser.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default="auto",
        help="who starts the processes: auto (torchrun or srun when their environment "
        "variables say so, else this script), spawn (this script: --num-gpus per machine), "
        "torchrun, slurm",
    )
    parser.add_argument(
        "--dist-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long a process waits for the others (a dead or hung node stops the job "
        f"after it); default ${TIMEOUT_ENV} or 1800",
    )
    default_url = parser.get_default("dist_url")
    args = parser.parse_args(_options_first(parser, list(sys.argv[1:] if argv is None else argv)))
    # detectron2's default port is fixed per user: a second run on the machine would die
    # with EADDRINUSE; on one machine, pick a free port instead.
    if args.dist_url == default_url and args.num_machines == 1:
        args.dist_url = "auto"
    return args


def cli(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # The checks run once per job (before any process starts, or on rank 0 of a job that
    # torchrun, srun or several machines started); every rank stops at an error.
    try:
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
            timeout=dist_timeout(args.dist_timeout),
            preflight=preflight,
            user_errors=USER_ERRORS,
            launcher=args.launcher,
        )
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")
    except torch.multiprocessing.ProcessExitedException as e:
        sys.exit(f"error: a training process failed ({e}); its message is in the log above")


if __name__ == "__main__":
    cli()
