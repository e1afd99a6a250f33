#!/usr/bin/env python
"""Inference latency and peak memory of a detector: eager PyTorch vs the ``torch.export``
program vs its AOTInductor package vs the ONNX model in ONNX Runtime, at batch 1, 4 and 8.

    python benchmarks/export_latency.py --device cpu --threads 1 --json export_latency.json
    python benchmarks/export_latency.py --device cuda --presets r50

Presets (untrained weights: latency does not depend on them):

* ``demo``: ``configs/demo.py`` (CQ-DINO, R18 quarter width, d=128, 2 + 3 layers, 100 queries,
  C=1,000, K=100) at the demo's test size, one 256 x 320 image;
* ``r50``: ``configs/coco.py`` (CQ-DINO R50 at the recipe widths: d=256, 6 + 6 layers, 900
  queries, C=80, K=30) on one 800 x 1333 image (padded to 800 x 1344).

Each runtime runs in its own child process (loads its artefact; per batch size one warm-up
call, then ``--repeats`` timed calls; median reported). A batch of B holds B different images
of the preset's size. ``ms`` is the wall time of a call, ``ms_per_image`` that / B, ``cpu_ms``
the process CPU time of a call (with one thread, what the call costs even when other jobs
share the cores and stretch the wall time). ``peak_rss_mib`` is the child's peak resident
memory during the timed calls of that batch size (``VmHWM`` after resetting it, so it includes
the weights and libraries loaded before), ``load_rss_mib`` its resident memory before the
first call. The ONNX model's size is the file size. The same inputs go to every runtime; their
detections are compared with eager (max score difference) as a sanity check. ONNX Runtime runs
with its default session options (``--no-ort-arena`` turns its CPU memory arena off).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import format_table, machine_info, run_json_child, write_json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {
    "demo": {"config": "configs/demo.py", "size": (256, 320), "overrides": []},
    "r50": {"config": "configs/coco.py", "size": (800, 1333), "overrides": []},
}
RUNTIMES = ("eager", "export", "aoti", "onnxruntime")


def _build(preset: str, device: str):
    from detectron2.config import LazyConfig, instantiate

    p = PRESETS[preset]
    cfg = LazyConfig.apply_overrides(
        LazyConfig.load(os.path.join(ROOT, p["config"])), p["overrides"]
    )
    torch.manual_seed(0)
    return instantiate(cfg.model).to(device).eval()


def _inputs(preset: str, divisibility: int, device: str, batch_size: int = 1):
    from cqdino.export import pad_images

    h, w = PRESETS[preset]["size"]
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, w, generator=gen) * 255 for _ in range(batch_size)]
    batch, sizes = pad_images(images, divisibility)
    return [im.to(device) for im in images], batch.to(device), sizes.to(device)


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _runner(args, meta):
    """``run(images, batch, sizes) -> scores of image 0`` for the runtime of ``args``."""
    device, art = args.device, args.artifacts
    if args.runtime == "eager":
        model = _build(args.preset, device)
        model.load_state_dict(torch.load(os.path.join(art, "weights.pth"), weights_only=True))
        return lambda images, batch, sizes: model([{"image": im} for im in images])[0][
            "instances"
        ].scores
    if args.runtime == "export":
        from cqdino.export import load_program

        module = load_program(os.path.join(art, "program.pt2")).module()
        return lambda images, batch, sizes: module(batch, sizes)[1][0]
    if args.runtime == "aoti":
        from torch._inductor import aoti_load_package

        import cqdino._C  # noqa: F401  (the custom ops the package calls)

        module = aoti_load_package(os.path.join(art, "aoti.pt2"))
        return lambda images, batch, sizes: module(batch, sizes)[1][0]
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = not args.no_ort_arena
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(os.path.join(art, "model.onnx"), options, providers=providers)

    def run(images, batch, sizes):
        feed = {"images": batch.cpu().numpy(), "image_sizes": sizes.cpu().numpy()}
        return torch.from_numpy(session.run(None, feed)[1][0])

    return run


def child(args) -> None:
    """Load one runtime's artefact, time it at each batch size, print one JSON line."""
    torch.set_num_threads(args.threads)
    device = args.device
    meta = json.load(open(os.path.join(args.artifacts, "meta.json")))
    run = _runner(args, meta)
    load_rss = _rss("VmRSS")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    results = {}
    for batch_size in args.batches:
        images, batch, sizes = _inputs(args.preset, meta["divisibility"], device, batch_size)
        with torch.no_grad():
            scores = run(images, batch, sizes)  # warm-up (and the sanity check's output)
            sync()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM
                f.write("5")
            times, cpu = [], []
            for _ in range(args.repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                run(images, batch, sizes)
                sync()
                times.append((time.perf_counter() - t0) * 1e3)
                cpu.append((time.process_time() - c0) * 1e3)
        result = {
            "ms": statistics.median(times),
            "ms_min": min(times),
            "cpu_ms": statistics.median(cpu),
            "load_rss_mib": load_rss / 2**20,
            "peak_rss_mib": _rss("VmHWM") / 2**20,
            "scores": scores.float().cpu()[:50].tolist(),
        }
        if device == "cuda":
            result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        results[str(batch_size)] = result
    print(json.dumps(results))


def prepare(preset: str, device: str, art: str, runtimes: List[str]) -> Dict:
    """Export the preset's model once; artefacts and timings of the export steps."""
    from cqdino.export import aoti_package, export_onnx, export_program, save_program

    model = _build(preset, device)
    torch.save(model.state_dict(), os.path.join(art, "weights.pth"))
    h, w = PRESETS[preset]["size"]
    d = 64  # an upper bound of the export's divisibility, for the size range only
    max_size = max(-(-h // d) * d, -(-w // d) * d)
    t0 = time.perf_counter()
    program, info = export_program(model, max_size=max(max_size, 512), max_batch=8)
    # the inputs are padded to the divisibility the program was exported for
    meta = {"divisibility": info["size_divisibility"], "export_s": {}}
    meta["export_s"]["torch.export"] = time.perf_counter() - t0
    save_program(program, os.path.join(art, "program.pt2"), info)
    if "onnxruntime" in runtimes:
        t0 = time.perf_counter()
        export_onnx(program, os.path.join(art, "model.onnx"), info)
        meta["export_s"]["onnx"] = time.perf_counter() - t0
        meta["onnx_mib"] = os.path.getsize(os.path.join(art, "model.onnx")) / 2**20
    if "aoti" in runtimes:
        t0 = time.perf_counter()
        try:
            aoti_package(program, os.path.join(art, "aoti.pt2"))
            meta["export_s"]["aoti"] = time.perf_counter() - t0
        except Exception as e:  # report and go on: AOTInductor support varies by platform
            meta["aoti_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    meta["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    json.dump(meta, open(os.path.join(art, "meta.json"), "w"))
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--batches", nargs="+", type=int, default=[1, 4, 8], help="batch sizes (<= 8)"
    )
    parser.add_argument(
        "--no-ort-arena", action="store_true", help="turn ONNX Runtime's CPU memory arena off"
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--timeout", type=float, default=1800, help="per child, seconds")
    # internal: one runtime in a child process
    parser.add_argument("--child", dest="runtime", choices=RUNTIMES, help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--artifacts", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not all(1 <= b <= 8 for b in args.batches):
        parser.error("--batches: each in 1..8 (the export's --max-batch)")
    if args.runtime:
        child(args)
        return
    torch.set_num_threads(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    rows, record = [], {"machine": machine_info(args.device), "device": args.device, "runs": []}
    for preset in args.presets:
        with tempfile.TemporaryDirectory() as art:
            meta = prepare(preset, args.device, art, args.runtimes)
            h, w = PRESETS[preset]["size"]
            d = meta["divisibility"]
            padded = f"3x{-(-h // d) * d}x{-(-w // d) * d}"
            eager_scores = None
            for runtime in args.runtimes:
                if runtime == "aoti" and "aoti_error" in meta:
                    res = {"error": "compile", "detail": meta["aoti_error"]}
                else:
                    argv = [sys.executable, os.path.abspath(__file__), "--child", runtime]
                    argv += ["--preset", preset, "--artifacts", art, "--device", args.device]
                    argv += ["--threads", str(args.threads), "--repeats", str(args.repeats)]
                    argv += ["--batches", *map(str, args.batches)]
                    argv += ["--no-ort-arena"] if args.no_ort_arena else []
                    res = run_json_child(argv, env, args.timeout)
                for batch_size in args.batches:
                    row = {"preset": preset, "input": f"{batch_size}x{padded}", "dtype": "float32"}
                    row.update({"runtime": runtime, "batch": batch_size})
                    one = res.get(str(batch_size)) if "error" not in res else None
                    if one is None:
                        detail = res.get("detail", "no result").strip().splitlines() or [""]
                        row["note"] = f"{res.get('error', 'missing')}: {detail[-1][:120]}"
                        rows.append(row)
                        continue
                    row.update(
                        {k: one[k] for k in ("ms", "cpu_ms", "peak_rss_mib", "load_rss_mib")}
                    )
                    row["ms_per_image"] = one["ms"] / batch_size
                    if "cuda_peak_mib" in one:
                        row["cuda_peak_mib"] = one["cuda_peak_mib"]
                    scores = torch.tensor(one["scores"])
                    if runtime == "eager" and batch_size == args.batches[0]:
                        eager_scores = scores
                    elif eager_scores is not None:
                        n = min(len(scores), len(eager_scores))
                        diff = (scores[:n] - eager_scores[:n]).abs().max().item()
                        row["max_score_diff"] = f"{diff:.1e}"
                    if runtime == "onnxruntime" and "onnx_mib" in meta:
                        row["file_mib"] = meta["onnx_mib"]
                    rows.append(row)
                    print(format_table([row], list(row)), flush=True)
            record["runs"].append({"preset": preset, "input": padded, **meta})
    columns = ["preset", "input", "dtype", "runtime", "batch", "ms", "ms_per_image", "cpu_ms"]
    columns += ["peak_rss_mib", "load_rss_mib"]
    columns += ["file_mib", "max_score_diff", "note"]
    if args.device == "cuda":
        columns.insert(5, "cuda_peak_mib")
    print()
    print(format_table(rows, columns))
    for run in record["runs"]:
        print(
            f"{run['preset']}: export times (s) {run['export_s']}, {run['params_m']:.1f} M params"
        )
    record["rows"] = rows
    write_json(args.json, record)


if __name__ == "__main__":
    main()
