"""Inference over a dataset with a progress bar, and the results table."""

import json
import logging
import os
import sys
import time
from contextlib import ExitStack
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from detectron2.evaluation import DatasetEvaluator, DatasetEvaluators
from detectron2.evaluation.evaluator import inference_context
from detectron2.utils import comm
from tabulate import tabulate
from torch import nn
from tqdm import tqdm

__all__ = ["inference_on_dataset", "format_results", "read_metrics"]

logger = logging.getLogger(__name__)


def inference_on_dataset(
    model: nn.Module,
    data_loader: Iterable,
    evaluator: Union[DatasetEvaluator, List[DatasetEvaluator], None],
    progress: Optional[bool] = None,
) -> Dict[str, Any]:
    """detectron2's ``inference_on_dataset`` (eval mode, no grad, ``evaluator.process`` per
    batch, ``evaluate()`` gathers over ranks) with a tqdm progress bar on rank 0.

    Args:
        progress: show the bar (default: on rank 0 only).
    """
    if evaluator is None:
        evaluator = DatasetEvaluators([])
    elif isinstance(evaluator, (list, tuple)):
        evaluator = DatasetEvaluators(evaluator)
    if progress is None:
        progress = comm.is_main_process()
    try:
        total = len(data_loader)
    except TypeError:
        total = None
    evaluator.reset()
    start = time.perf_counter()
    n = 0
    with ExitStack() as stack:
        if isinstance(model, nn.Module):
            stack.enter_context(inference_context(model))
        stack.enter_context(torch.no_grad())
        bar = stack.enter_context(
            tqdm(
                data_loader,
                total=total,
                desc="inference",
                unit="img",
                disable=not progress,
                file=sys.stderr,
                dynamic_ncols=True,
            )
        )
        for inputs in bar:
            outputs = model(inputs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            evaluator.process(inputs, outputs)
            n += len(inputs)
    elapsed = time.perf_counter() - start
    logger.info(
        f"Inference on {n} images (this rank) in {elapsed:.1f} s ({elapsed / max(n, 1):.3f} s/img)"
    )
    results = evaluator.evaluate()
    return {} if results is None else results  # None on ranks > 0


def format_results(results: Mapping[str, Mapping[str, float]], keys=None) -> str:
    """A pipe table of the headline metrics of each task (default: AP, AP50, AP75 and the
    rare/common/frequent APs, the class-agnostic APs and the selector's recall when present)."""
    rows = []
    for task, metrics in results.items():
        if not isinstance(metrics, Mapping):
            continue
        names = keys or [
            k
            for k in (
                "AP",
                "AP50",
                "AP75",
                "APr",
                "APc",
                "APf",
                "APs",
                "APm",
                "APl",
                "AP-agnostic",
                "AP50-agnostic",
            )
            if k in metrics
        ] + sorted(k for k in metrics if k.startswith(("ARC@", "recall@")))
        rows.append([task] + [f"{metrics[k]:.2f}" for k in names])
    if not rows:
        return "(no results)"
    return tabulate(rows, headers=["task"] + list(names), tablefmt="pipe")


def read_metrics(output_dir: str) -> Tuple[Dict[int, dict], Dict[int, dict]]:
    """A run's ``metrics.json`` as (training records, evaluation records), each keyed by
    iteration (a re-run iteration keeps its last record); empty if the file is absent."""
    train: Dict[int, dict] = {}
    evals: Dict[int, dict] = {}
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        return train, evals
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if "total_loss" in rec:
                train[rec["iteration"]] = rec
            if any(k.endswith("/AP") for k in rec):
                evals[rec["iteration"]] = rec
    return train, evals
