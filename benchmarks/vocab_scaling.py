#!/usr/bin/env python
"""Vocabulary scaling of the classification path: CQ-DINO vs DINO from C = 80 to 50,000.

    python benchmarks/vocab_scaling.py [--device cpu|cuda] [--quick] [--json PATH] [--plot PATH]

What is measured: one training step (forward, losses, backward) and one inference step of
everything in the detector whose cost depends on the vocabulary size C, at the recipe's widths
(900 matching queries, ``dn_number=100`` denoising pairs, d = 256, 6 decoder layers plus the
encoder's two-stage proposal scoring, batch 2, ``--image-size`` 800 x 1333 by default):

* **DINO**: ``LinearClassHead(C)`` (one ``Linear(256, C)`` per decoder layer and one for the
  encoder proposals), the DN label table of C rows (``CDNGenerator``), ``HungarianMatcher`` and
  ``SetCriterion`` (sigmoid focal loss over all C columns on every layer, the encoder proposals
  and the DN groups).
* **CQ-DINO**: ``build_contrastive_class_head`` (category queries ``[C, 768]`` with tree
  aggregation over a synthetic category tree, the image-guided selector over the last backbone
  stage, the ASL selection loss with ancestor masking, top-K = 100 and the contrastive logits),
  its DN table of K + 1 rows, and the same matcher and criterion (focal loss over K columns).
  ``CQ-DINO-ckpt`` is the same with ``selector_checkpoint=True`` (selector chunks recomputed in
  backward).

The rest of the detector (backbone, neck, encoder and decoder layers, box heads) is the same for
both and independent of C; it is replaced by seeded stand-in tensors that require grad: the last
backbone stage ``[B, 2048, H/32, W/32]`` (read by the selector), the encoder's output memory
``[B, S, 256]`` over the S tokens of the 4 levels (strides 8-64), the 6 decoder layers' hidden
states ``[B, N_dn + 900, 256]`` (plus the DN label embeddings, so the DN table gets its gradient)
and box logits. The two-stage step is the one of ``DINOTransformer.forward``: score all S
proposals with the class head, keep the top 900 by their best column. Inference follows
``DINO.inference``: the head on the proposals and on every decoder layer, then the top 300
(query, column) pairs of the last layer mapped to classes. What CQ-DINO adds that does not
depend on C (encoder image<->category fusion, decoder category attention) is left out of both.

How: each (model, C) runs in its own process (fresh allocator, no cross-talk): build, one
warm-up training step, then ``--repeats`` timed training steps and ``--repeats`` inference
steps; a case whose warm-up took more than ``--slow-step-s`` is timed once, and one that the
model's measured points predict to be that slow runs one step of each without a warm-up (the
table's ``n`` and ``warmup`` columns say which). Peak memory on the CPU is the kernel's
resident high-water mark (``VmHWM``, reset before the measured steps) above the resident size
just before them (parameters and stand-ins included there, freed heap returned with
``malloc_trim``; ``MALLOC_MMAP_THRESHOLD_`` fixed so large blocks go back to the OS when
freed); on CUDA ``max_memory_allocated`` above the
allocation before the step. "train total" adds the parameters to the training peak (the
stand-ins are left out: they exist in either model). Times are medians; on a shared CPU they
are noisy. Per class: slopes of a least-squares line through the measured points (parameters:
of the modules at the widths run, and separately at the recipe widths, built without running).

Memory guard (CPU): before each case the peak is estimated from the model's measured points;
cases above ``--mem-budget-gib`` (or what the machine has available) are not run and are
reported as ``skipped`` with the estimate, marked as such; a running case whose RSS goes past
the limit is killed and reported ``rss_limit``. ``--selector cpu`` (the CPU default) narrows
the selector so a full run fits in minutes on a few cores; the table header says which widths
were run.
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(_HERE)
sys.path.insert(0, _HERE)
sys.path.insert(0, REPO)  # this checkout's cqdino, not an installed one

from common import (  # noqa: E402
    format_table,
    linear_fit,
    log_log_axes,
    machine_info,
    median,
    mem_available_bytes,
    release_free_memory,
    run_json_child,
    save_figure,
    write_outputs,
)

MODELS = ("DINO", "CQ-DINO", "CQ-DINO-ckpt")
FULL_CLASSES = (80, 1000, 5000, 13204, 50000)
# Category selector widths: the recipe, and a narrow one for CPU runs (documented in the table).
SELECTORS = {
    "recipe": dict(query_dim=768, memory_dim=512, num_heads=4, ffn_dim=3072, num_layers=2),
    "cpu": dict(query_dim=256, memory_dim=256, num_heads=4, ffn_dim=1024, num_layers=2),
}
TREE_FANOUT = 6


# ---------------------------------------------------------------- the classification path
def write_benchmark_tree(path: str, num_categories: int, fanout: int = TREE_FANOUT) -> None:
    """A category tree of ``num_categories`` in the V3Det tree-json layout: a non-category root
    and a complete ``fanout``-ary tree of categories below it (category j's parent is category
    ``(j - 1) // fanout``, 0 meaning the root), so depth grows like ``log_fanout(C)``."""
    nodes = {"root": "root", **{f"c{j}": f"category {j}" for j in range(1, num_categories + 1)}}
    child2father = {}
    for j in range(1, num_categories + 1):
        p = (j - 1) // fanout
        child2father[f"c{j}"] = ["root" if p == 0 else f"c{p}"]
    tree = {
        "categoryid2treeid": {str(j): f"c{j}" for j in range(1, num_categories + 1)},
        "id2name": nodes,
        "child2father": child2father,
    }
    with open(path, "w") as f:
        json.dump(tree, f)


def encoder_tokens(height: int, width: int, strides: Sequence[int] = (8, 16, 32, 64)) -> int:
    """Tokens of the encoder memory for one padded image (4 levels, ceil at each stride)."""
    return sum(math.ceil(height / s) * math.ceil(width / s) for s in strides)


def build_path(cfg: dict, device: torch.device, tree_dir: str):
    """The C-dependent modules of one model: ``(class_head, dn_generator, criterion)``."""
    from cqdino.modeling import (
        CDNGenerator,
        HungarianMatcher,
        LinearClassHead,
        SetCriterion,
        build_contrastive_class_head,
    )

    C, D, L = cfg["C"], cfg["embed_dim"], cfg["num_decoder_layers"]
    if cfg["model"] == "DINO":
        head = LinearClassHead(C, D, L)
    else:
        tree_file = os.path.join(tree_dir, f"tree_{C}.json")
        if not os.path.exists(tree_file):
            write_benchmark_tree(tree_file, C)
        sel = cfg["selector"]
        head = build_contrastive_class_head(
            C,
            cfg["in_channels"],
            num_decoder_layers=L,
            embed_dim=D,
            topk=cfg["topk"],
            query_dim=sel["query_dim"],
            selector_memory_dim=sel["memory_dim"],
            selector_num_heads=sel["num_heads"],
            selector_ffn_dim=sel["ffn_dim"],
            selector_num_layers=sel["num_layers"],
            selector_chunk_size=cfg["selector_chunk_size"],
            selector_checkpoint=cfg["model"] == "CQ-DINO-ckpt",
            relation="tree",
            tree_file=tree_file,
            ancestor_masking=True,
            selection_loss="asl",
        )
    dn = CDNGenerator(head.num_dn_labels, head.num_noise_labels, D, cfg["dn_number"], 0.5, 1.0)
    criterion = SetCriterion(HungarianMatcher(2.0, 5.0, 2.0), loss_class_weight=1.0)
    return head.to(device), dn.to(device), criterion


def make_inputs(cfg: dict, device: torch.device) -> dict:
    """Seeded stand-ins for the C-independent parts of the detector (same for both models)."""
    g = torch.Generator().manual_seed(cfg["seed"])
    B, D, L, Q = cfg["batch"], cfg["embed_dim"], cfg["num_decoder_layers"], cfg["num_queries"]
    H, W = cfg["image_size"]
    G, C = cfg["gt_per_image"], cfg["C"]
    S = encoder_tokens(H, W)
    groups = max(cfg["dn_number"] // G, 1)
    num_dn = 2 * G * groups

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device).requires_grad_()

    centres = torch.rand(B, G, 2, generator=g) * 0.6 + 0.2
    sizes = torch.rand(B, G, 2, generator=g) * 0.25 + 0.05
    gt_boxes = torch.cat([centres, sizes], -1).to(device)
    gt_classes = [torch.randperm(C, generator=g)[:G].to(device) for _ in range(B)]
    return {
        "res5": torch.randn(
            B, cfg["in_channels"], math.ceil(H / 32), math.ceil(W / 32), generator=g
        )
        .relu()
        .to(device),
        "image_sizes": [(H, W)] * B,
        "enc_memory": leaf(B, S, D),
        "enc_box_logits": leaf(B, S, 4, scale=0.5),
        "hidden": leaf(L, B, num_dn + Q, D),
        "box_logits": leaf(L, B, num_dn + Q, 4, scale=0.5),
        "gt_classes": gt_classes,
        "gt_boxes": [gt_boxes[b] for b in range(B)],
        "num_dn": num_dn,
    }


def two_stage(head, state, memory, box_logits, num_queries):
    """Encoder proposal scoring and top-``num_queries`` selection (as ``DINOTransformer``)."""
    enc_logits = head(memory, state, None)  # (B, S, N_col)
    scores = enc_logits.max(-1)[0]
    topk = scores.topk(min(num_queries, scores.shape[1]), dim=1).indices  # (B, Q)
    top_logits = enc_logits.gather(1, topk[..., None].expand(-1, -1, enc_logits.shape[-1]))
    top_boxes = box_logits.gather(1, topk[..., None].expand(-1, -1, 4)).sigmoid()
    return {"pred_logits": top_logits, "pred_boxes": top_boxes}


def train_step(modules, x: dict, num_queries: int) -> float:
    """Forward + losses + backward of the classification path; returns the total loss."""
    head, dn_generator, criterion = modules
    state = head.prepare({"res5": x["res5"]}, x["image_sizes"], x["gt_classes"])
    labels = head.map_targets(x["gt_classes"], state)
    targets = [{"labels": lab, "boxes": box} for lab, box in zip(labels, x["gt_boxes"])]
    dn_content, _, _, dn_meta = dn_generator(
        [head.map_dn_labels(lab) for lab in labels], x["gt_boxes"], num_queries
    )
    num_dn = dn_meta["num_dn"]
    assert num_dn == x["num_dn"], (num_dn, x["num_dn"])
    enc_outputs = two_stage(head, state, x["enc_memory"], x["enc_box_logits"], num_queries)
    # decoder stand-in: the DN queries carry their label embedding into every layer
    content = torch.nn.functional.pad(dn_content, (0, 0, 0, num_queries))  # (B, N_dn + Q, D)
    logits = [head(h + content, state, i) for i, h in enumerate(x["hidden"])]
    boxes = x["box_logits"].sigmoid()
    layers = [
        {"pred_logits": lg[:, num_dn:], "pred_boxes": bx[:, num_dn:]}
        for lg, bx in zip(logits, boxes)
    ]
    outputs = dict(layers[-1], aux_outputs=layers[:-1], enc_outputs=enc_outputs)
    outputs["dn_outputs"] = [
        {"pred_logits": lg[:, :num_dn], "pred_boxes": bx[:, :num_dn]}
        for lg, bx in zip(logits, boxes)
    ]
    losses = criterion(outputs, targets, dn_meta)
    losses.update(state.losses)
    total = sum(losses.values())
    total.backward()
    return float(total.detach())


@torch.no_grad()
def inference_step(modules, x: dict, num_queries: int, num_select: int = 300):
    """Class scores of the inference path: returns ``(scores [B, 300], classes [B, 300])``."""
    head = modules[0]
    state = head.prepare({"res5": x["res5"]}, x["image_sizes"], None)
    two_stage(head, state, x["enc_memory"], x["enc_box_logits"], num_queries)
    num_dn = x["num_dn"]  # no DN queries at inference: the matching queries only
    logits = [head(h[:, num_dn:], state, i) for i, h in enumerate(x["hidden"])]
    B, Q, N = logits[-1].shape
    scores, idx = logits[-1].sigmoid().flatten(1).topk(min(num_select, Q * N), dim=1)
    return scores, head.columns_to_classes(idx % N, state)


def num_params(modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


# ---------------------------------------------------------------- one case (child process)
def _rss(key: str) -> int:
    from tests.memory_probe import rss_bytes

    return rss_bytes(key)


def _clear_grads(modules, x: dict) -> None:
    for m in modules:
        m.zero_grad(set_to_none=True)
    for v in x.values():
        if isinstance(v, torch.Tensor):
            v.grad = None


def run_case(cfg: dict) -> dict:
    """Build one (model, C), warm up, time and measure; returns a JSON-able dict."""
    from tests.memory_probe import reset_peak_rss

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    device = torch.device(cfg["device"])
    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tree_dir:
        modules = build_path(cfg, device, tree_dir)
    x = make_inputs(cfg, device)
    Q = cfg["num_queries"]
    param_bytes = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def measure(fn, repeats):
        """Times of ``repeats`` calls (ms) and their peak memory above the start (bytes)."""
        _clear_grads(modules, x)
        if cuda:
            sync()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            release_free_memory()
            base = _rss("VmRSS")
            reset_peak_rss()
        times, result = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            result = fn()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
            _clear_grads(modules, x)
        peak = torch.cuda.max_memory_allocated() if cuda else _rss("VmHWM")
        return times, peak - base, result

    repeats = cfg["repeats"]
    try:
        if cfg["warmup"]:
            t0 = time.perf_counter()
            train_step(modules, x, Q)  # lazy allocations, extension loading
            sync()
            if time.perf_counter() - t0 > cfg["slow_step_s"]:
                repeats = 1  # a slow case: one timed step (the table says how many)
        train_ms, train_peak, loss = measure(lambda: train_step(modules, x, Q), repeats)
        infer_ms, infer_peak, (scores, _) = measure(lambda: inference_step(modules, x, Q), repeats)
    except torch.cuda.OutOfMemoryError as e:  # CUDA only; the CPU guard is the parent's
        return {"error": "oom", "detail": str(e)[:500]}
    head = modules[0]
    return {
        "warmup": cfg["warmup"],
        "train_ms": train_ms,
        "infer_ms": infer_ms,
        "train_peak_bytes": int(train_peak),
        "infer_peak_bytes": int(infer_peak),
        "param_bytes": int(param_bytes),
        "params": num_params(modules),
        "loss": loss,
        "finite": bool(math.isfinite(loss) and torch.isfinite(scores).all()),
        "num_dn": x["num_dn"],
        "encoder_tokens": x["enc_memory"].shape[1],
        "num_columns": getattr(head, "num_topk", None) or head.num_classes,
    }


def run_cases(cases: List[dict]) -> List[dict]:
    """Cases one after the other in this process (``--quick``: one process for all)."""
    out = []
    for case in cases:
        out.append(run_case(case))
        release_free_memory()
    return out


# ---------------------------------------------------------------- parent: cases, table, plot
def recipe_params_per_class(cfg: dict) -> Dict[str, float]:
    """Parameters per category of each model at the recipe's selector widths (built at
    C = 1,000 and 2,000, both above K, and differenced; nothing is run)."""
    out = {}
    base = dict(cfg, selector=SELECTORS["recipe"])
    with tempfile.TemporaryDirectory() as d:
        for model in ("DINO", "CQ-DINO"):
            counts = []
            for C in (1000, 2000):
                counts.append(num_params(build_path(dict(base, model=model, C=C), "cpu", d)))
            out[model] = (counts[1] - counts[0]) / 1000
    return out


ESTIMATED = ("train_total_mib", "train_peak_mib", "infer_peak_mib", "train_ms", "infer_ms")


def _estimate(rows: List[dict], model: str, C: int, key: str) -> Optional[float]:
    """``key`` at ``C`` from a least-squares line through the model's measured points (above
    C = 80 when there are three or more: C = 80 is mostly fixed cost)."""
    pts = [(r["C"], r[key]) for r in rows if r["model"] == model and r["status"] == "measured"]
    pts = [p for p in pts if p[0] > 80] if len(pts) > 2 else pts
    if len(pts) < 2:
        return None
    slope, icpt = linear_fit([p[0] for p in pts], [p[1] for p in pts])
    return icpt + slope * C


def _measured_row(row: dict, res: dict) -> None:
    row.update(
        status="measured",
        n=len(res["train_ms"]),
        warmup=res["warmup"],
        train_ms=median(res["train_ms"]),
        infer_ms=median(res["infer_ms"]),
        train_peak_mib=res["train_peak_bytes"] / 2**20,
        train_total_mib=(res["train_peak_bytes"] + res["param_bytes"]) / 2**20,
        infer_peak_mib=res["infer_peak_bytes"] / 2**20,
        params_m=res["params"] / 1e6,
        columns=res["num_columns"],
        loss=res["loss"],
        finite=res["finite"],
        num_dn=res["num_dn"],
        encoder_tokens=res["encoder_tokens"],
        raw_train_ms=res["train_ms"],
        raw_infer_ms=res["infer_ms"],
    )


def run_all(args, cfg: dict) -> List[dict]:
    """Every (C, model) case, DINO and CQ-DINO back to back at each C (same machine state).
    One process per case, or one for all with ``--quick``; on the CPU each case is first
    checked against the memory limit (estimate from the model's measured points)."""
    env = dict(
        os.environ,
        PYTHONPATH=REPO,
        OMP_NUM_THREADS=str(cfg["threads"]),
        MALLOC_MMAP_THRESHOLD_="131072",
    )
    child = [sys.executable, os.path.abspath(__file__), "--child"]
    cases = [dict(cfg, model=m, C=C) for C in args.classes for m in args.models]
    rows: List[dict] = []
    if args.quick:  # a smoke test: one process, so numbers after the first case are rougher
        results = run_json_child(child + [json.dumps(cases)], env, args.timeout * len(cases))
        if "error" in results:
            raise RuntimeError(f"vocab_scaling --quick failed: {results['detail']}")
        for case, res in zip(cases, results):
            row = {"model": case["model"], "C": case["C"]}
            _measured_row(row, res)
            rows.append(row)
        return rows
    budget = args.mem_budget_gib * 2**30
    for case in cases:
        model, C = case["model"], case["C"]
        row: Dict[str, object] = {"model": model, "C": C}
        est_ms = _estimate(rows, model, C, "train_ms")
        if est_ms is not None and est_ms > cfg["slow_step_s"] * 1e3:
            case.update(warmup=False, repeats=1)  # a slow case: one step, no warm-up
        limit = None
        if cfg["device"] == "cpu":
            limit = min(budget, mem_available_bytes() - 2**30)
            est = _estimate(rows, model, C, "train_total_mib")
            if est is not None and est * 2**20 > limit:
                row.update(
                    status="skipped",
                    detail=f"estimated {est / 1024:.1f} GiB > limit {limit / 2**30:.1f} GiB",
                )
                row.update({k + "_estimate": _estimate(rows, model, C, k) for k in ESTIMATED})
                rows.append(row)
                print(f"skip {model} C={C}: {row['detail']}", file=sys.stderr, flush=True)
                continue
        t0 = time.perf_counter()
        res = run_json_child(
            child + [json.dumps([case])],
            env,
            timeout=args.timeout,
            rss_limit_bytes=None if limit is None else int(limit * 1.1),
        )
        if "error" in res or "error" in res[0]:
            err = res if "error" in res else res[0]
            row.update(status=err["error"], detail=err["detail"])
            row.update({k + "_estimate": _estimate(rows, model, C, k) for k in ESTIMATED})
        else:
            _measured_row(row, res[0])
        rows.append(row)
        took = time.perf_counter() - t0
        print(f"done {model} C={C}: {row['status']} ({took:.0f} s)", file=sys.stderr, flush=True)
    return rows


def display_rows(rows: List[dict]) -> List[dict]:
    """Rows for the printed table: a case that was not run shows its estimates as
    ``est. <value>`` in the measured columns."""
    out = []
    for r in rows:
        d = dict(r)
        if r["status"] != "measured":
            for k in ESTIMATED:
                e = r.get(k + "_estimate")
                d[k] = None if e is None else f"est. {e:.0f}"
        out.append(d)
    return out


def per_class(rows: List[dict]) -> Dict[str, Dict[str, Optional[float]]]:
    """Slopes over the measured points of each model: params and memory per category."""
    out = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        meas = [r for r in rows if r["model"] == model and r["status"] == "measured"]
        res: Dict[str, Optional[float]] = {"measured_points": len(meas)}
        for key, name, scale in (
            ("params_m", "params_per_class", 1e6),
            ("train_total_mib", "train_total_kib_per_class", 1024),
            ("train_peak_mib", "train_peak_kib_per_class", 1024),
            ("infer_peak_mib", "infer_peak_kib_per_class", 1024),
        ):
            if len(meas) >= 2:
                res[name] = linear_fit([r["C"] for r in meas], [r[key] for r in meas])[0] * scale
            else:
                res[name] = None
        out[model] = res
    return out


def ratios(rows: List[dict]) -> List[dict]:
    """DINO's training memory over CQ-DINO's at each C (measured, or estimate if marked)."""
    out = []
    by = {(r["model"], r["C"]): r for r in rows}
    for C in dict.fromkeys(r["C"] for r in rows):
        d = by.get(("DINO", C))
        if d is None:
            continue
        for model in ("CQ-DINO", "CQ-DINO-ckpt"):
            q = by.get((model, C))
            if q is None or q["status"] != "measured":
                continue
            if d["status"] == "measured":
                out.append(
                    dict(C=C, model=model, ratio=d["train_total_mib"] / q["train_total_mib"])
                )
            elif d.get("train_total_mib_estimate") is not None:  # not run: marked estimate
                r = d["train_total_mib_estimate"] / q["train_total_mib"]
                out.append(dict(C=C, model=model, ratio=r, dino_is_estimate=True))
    return out


def plot(rows: List[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [
        ("train_total_mib", "training peak memory + params (MiB)"),
        ("train_ms", "training step (ms, median)"),
        ("infer_peak_mib", "inference peak memory (MiB)"),
        ("infer_ms", "inference step (ms, median)"),
    ]
    colours = {"DINO": "tab:red", "CQ-DINO": "tab:blue", "CQ-DINO-ckpt": "tab:green"}
    for ax, (key, label) in zip(axes.flat, panels):
        for model in dict.fromkeys(r["model"] for r in rows):
            pts = [(r["C"], r[key]) for r in rows if r["model"] == model and r.get(key)]
            if pts:
                ax.plot(*zip(*pts), "o-", color=colours.get(model), label=model)
            est = [
                (r["C"], r[key + "_estimate"])
                for r in rows
                if r["model"] == model and r.get(key + "_estimate")
            ]
            if est and pts:
                ax.plot(
                    [pts[-1][0], *[e[0] for e in est]],
                    [pts[-1][1], *[e[1] for e in est]],
                    "o--",
                    mfc="none",
                    color=colours.get(model),
                    label=f"{model} (estimate, not run)",
                )
        log_log_axes(ax, label)
    axes[0, 0].legend(fontsize=8)
    save_figure(fig, path, title)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--quick", action="store_true", help="C in {80, 1000}, small image, 1 repeat")
    ap.add_argument("--json", default=None, help="write the results here (atomically)")
    ap.add_argument("--plot", default=None, help="write a PNG plot here")
    ap.add_argument("--classes", type=int, nargs="+", default=None)
    ap.add_argument("--models", nargs="+", default=None, choices=MODELS)
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per case")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per case")
    ap.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"))
    ap.add_argument("--gt-per-image", type=int, default=10)
    ap.add_argument("--selector", choices=sorted(SELECTORS), default=None)
    ap.add_argument("--selector-chunk-size", type=int, default=2048)
    ap.add_argument("--mem-budget-gib", type=float, default=12.0, help="CPU: skip cases above")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
    ap.add_argument(
        "--slow-step-s",
        type=float,
        default=15.0,
        help="seconds: a case whose warm-up step takes longer is timed once; one predicted "
        "(from the measured points) to take longer is run once without a warm-up",
    )
    ap.add_argument(
        "--no-warmup", action="store_true", help="no warm-up step (for a few slow cases)"
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child is not None:
        print(json.dumps(run_cases(json.loads(args.child))))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    args.classes = args.classes or ([80, 1000] if args.quick else list(FULL_CLASSES))
    args.models = args.models or (["DINO", "CQ-DINO"] if args.quick else list(MODELS))
    repeats = args.repeats or (1 if args.quick else 3)
    image_size = args.image_size or ([320, 320] if args.quick else [800, 1333])
    selector_name = args.selector or ("cpu" if args.device == "cpu" else "recipe")
    cfg = dict(
        device=args.device,
        threads=args.threads,
        seed=0,
        batch=2,
        embed_dim=256,
        num_decoder_layers=6,
        num_queries=900,
        dn_number=100,
        gt_per_image=args.gt_per_image,
        image_size=image_size,
        in_channels=2048,
        topk=100,
        selector=SELECTORS[selector_name],
        selector_chunk_size=args.selector_chunk_size,
        repeats=repeats,
        warmup=not args.no_warmup,
        slow_step_s=args.slow_step_s,
    )
    sel = SELECTORS[selector_name]
    widths = ", ".join(f"{k}={v}" for k, v in sel.items())
    header = (
        f"classification path, batch 2 x {image_size[0]}x{image_size[1]} "
        f"({encoder_tokens(*image_size)} encoder tokens), 900 queries + DN (dn_number=100, "
        f"{args.gt_per_image} GT/image), d=256, 6 decoder layers + encoder proposals, top-K=100; "
        f"selector '{selector_name}' ({widths})"
        + ("" if selector_name == "recipe" else " -- NARROWER than the recipe (768/512/4/3072/2)")
        + f"; {args.device}, {args.threads} thread(s), median of n timed steps after a warm-up "
        f"step ({repeats}; 1 when the warm-up took > {args.slow_step_s:g} s; 1 and no warm-up "
        "when the measured points predict a slower step)"
    )
    info = machine_info(args.device)
    print("machine:", ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    print(header, flush=True)
    t0 = time.perf_counter()
    rows = run_all(args, cfg)
    slopes = per_class(rows)
    ratio_rows = ratios(rows)
    recipe_ppc = recipe_params_per_class(cfg)
    elapsed = time.perf_counter() - t0

    columns = ["model", "C", "status", "n", "warmup", "train_ms", "infer_ms", "train_total_mib"]
    columns += ["train_peak_mib", "infer_peak_mib", "params_m"]
    print(header)
    print(format_table(display_rows(rows), columns))
    for r in rows:
        if r["status"] not in ("measured",):
            print(f"  {r['model']} C={r['C']}: {r['status']}: {r.get('detail', '')[-300:]}")
    print("\nper class (least-squares slope over the measured points):")
    slope_rows = [dict(model=m, **v) for m, v in slopes.items()]
    for r in slope_rows:
        r["params_per_class_recipe_widths"] = recipe_ppc.get(r["model"].replace("-ckpt", ""))
    print(
        format_table(
            slope_rows,
            [
                "model",
                "measured_points",
                "params_per_class",
                "params_per_class_recipe_widths",
                "train_total_kib_per_class",
                "train_peak_kib_per_class",
                "infer_peak_kib_per_class",
            ],
        )
    )
    print("\nDINO / CQ-DINO training memory (params + peak), goal >= 3 at C = 13,204 and 50,000:")
    print(format_table(ratio_rows, ["C", "model", "ratio", "dino_is_estimate"]))
    print(f"\ntotal time {elapsed:.0f} s")
    payload = {
        "info": dict(info, header=header, elapsed_s=round(elapsed, 1)),
        "config": cfg,
        "results": rows,
        "per_class": slope_rows,
        "memory_ratio": ratio_rows,
    }
    write_outputs(args.json, payload, args.plot, lambda path: plot(rows, path, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
