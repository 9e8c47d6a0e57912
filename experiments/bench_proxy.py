"""Proxy cost: seconds per candidate at the COCO proxy setting (``conf/proxy_eval/coco.yaml``).

Times exactly what a trial of ``proxy_eval.cached.CachedEvaluator`` runs -- decoder build,
``train_decoder`` (``iters`` SGD iterations of ``batch_size`` images, bf16 autocast on GPU) and
``predict_decoder`` (validation loss and detections of ``val_images`` images) -- for ``nasfcos``,
``fcos`` and random codes of the joint space, on random backbone features of the right shapes
(C3-C5 of the backbone at the proxy resolution, fp16, held on the device like cached features)
with random boxes. pycocotools scoring is CPU work after the GPU is done and is not included
(``--score`` adds it when pycocotools is installed).

    python experiments/bench_proxy.py --device cuda            # the documented COCO setting
    python experiments/bench_proxy.py --quick                  # CPU smoke: tiny sizes, seconds

Imports only torch, torchvision and this project's modules (no hydra, omegaconf or pycocotools):
the two YAML files it needs are flat and read by a small reader below.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from detector.model.backbone import ShapeSpec, build_backbone  # noqa: E402
from detector.model.build import build_decoder  # noqa: E402
from detector.model.recipe import Recipe  # noqa: E402
from detector.arch.zoo import zoo_arch  # noqa: E402
from proxy_eval.feature_cache import SplitFeatures  # noqa: E402
from proxy_eval.settings import TrialSettings
from detector.model.cost import decoder_cost
from proxy_eval.decoder_training import place_split, predict_decoder, train_decoder
from detector.arch.space import SearchSpace  # noqa: E402

CONF = ROOT / "conf"
NUM_CLASSES = 80
QUICK = {"resolution": 128, "width": 32, "iters": 3, "batch_size": 2, "val_images": 4, "eval_batch_size": 4}


def read_flat_yaml(path: Path) -> dict:
    """``key: value  # comment`` lines of a flat YAML file (values: null, booleans, numbers, lists)."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].rstrip()
        if not line or line.startswith(" ") or ":" not in line:
            continue
        key, raw = (part.strip() for part in line.split(":", 1))
        literal = {"null": "None", "true": "True", "false": "False"}.get(raw, raw.replace(".inf", "1e999"))
        try:
            values[key] = ast.literal_eval(literal)
        except (ValueError, SyntaxError):
            values[key] = raw
    return values


def trial_settings(proxy: dict, device: str, quick: bool) -> tuple[TrialSettings, int, int]:
    """(settings, resolution, val_images) of the COCO proxy config, shrunk with ``--quick``."""
    if quick:
        proxy = {**proxy, **QUICK}
    fields = set(TrialSettings.__dataclass_fields__) - {"device", "reward", "fail_prob", "inject_nan"}
    chosen = {k: proxy[k] for k in fields if k in proxy and proxy[k] is not None}
    chosen["width"] = proxy.get("width") or 256
    return TrialSettings(**chosen, device=device), int(proxy["resolution"]), int(proxy["val_images"])


def random_split(count: int, shapes: dict[str, ShapeSpec], resolution: int,
                 generator: torch.Generator) -> SplitFeatures:
    """``count`` images of random ReLU-like fp16 features and 1-10 random boxes each."""
    features = {level: torch.randn(count, spec.channels, resolution // spec.stride, resolution // spec.stride,
                                   generator=generator).relu_().half() for level, spec in shapes.items()}
    boxes, labels = [], []
    for _ in range(count):
        k = int(torch.randint(1, 11, (), generator=generator))
        size = torch.exp(torch.empty(k, 2).uniform_(math.log(8), math.log(resolution * 0.9), generator=generator))
        corner = torch.rand(k, 2, generator=generator) * (resolution - size)
        boxes.append(torch.cat([corner, corner + size], dim=1))  # (k, 4) xyxy inside the image
        labels.append(torch.randint(0, NUM_CLASSES, (k,), generator=generator))
    return SplitFeatures(features, boxes, labels, list(range(count)), [(resolution, resolution)] * count)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(code, shapes, train, val, settings: TrialSettings, recipe: Recipe, resolution: int,
              device: torch.device, score: bool) -> dict:
    """Seconds of one candidate, split into build / train / validate (/ score)."""
    params, gflops = decoder_cost(code, shapes, NUM_CLASSES, recipe, settings.width, resolution)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    torch.manual_seed(0)
    fpn, head = build_decoder(code, shapes, NUM_CLASSES, recipe, settings.width)
    fpn, head = fpn.to(device), head.to(device)
    sync(device)
    built = time.perf_counter()
    train_decoder(fpn, head, train, settings, recipe, NUM_CLASSES, device, seed=0)
    sync(device)
    trained = time.perf_counter()
    _, detections = predict_decoder(fpn, head, val, settings, recipe, NUM_CLASSES, device)
    sync(device)
    validated = time.perf_counter()
    row = {"params_m": params / 1e6, "gflops": gflops, "build_s": built - start, "train_s": trained - built,
           "val_s": validated - trained, "ms_per_iter": 1000 * (trained - built) / settings.iters}
    if score:
        from proxy_eval.cached import proxy_val_coco, score_detections

        score_detections(detections, val.split, proxy_val_coco(val.split, NUM_CLASSES), NUM_CLASSES)
        row["score_s"] = time.perf_counter() - validated
    row["total_s"] = time.perf_counter() - start
    row["peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:k]")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke run")
    parser.add_argument("--backbone", default="resnet50", help="backbone whose C3-C5 shapes the features take")
    parser.add_argument("--random-codes", type=int, default=5, help="random codes of the joint space")
    parser.add_argument("--pool", type=int, default=512, help="distinct proxy-train images held on the device")
    parser.add_argument("--iters", type=int, default=None, help="override the config's iterations")
    parser.add_argument("--deform-impl", default=None, help="torchvision | fast | auto (default: the config's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random codes and features")
    parser.add_argument("--score", action="store_true", help="also time pycocotools scoring (needs pycocotools)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)

    device_name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device_name)
    proxy = read_flat_yaml(CONF / "proxy_eval" / "coco.yaml")
    settings, resolution, val_images = trial_settings(proxy, device_name, args.quick)
    if args.iters:
        settings = replace(settings, iters=args.iters)
    if args.deform_impl:
        settings = replace(settings, deform_impl=args.deform_impl)
    recipe = Recipe.from_cfg(read_flat_yaml(CONF / "recipe" / "nasfcos.yaml"))
    backbone = "resnet18" if args.quick else args.backbone
    with torch.device("meta"):
        shapes = build_backbone(backbone, "none").output_shapes()

    generator = torch.Generator().manual_seed(args.seed)
    pool = min(args.pool, 8) if args.quick else args.pool
    train = place_split(random_split(pool, shapes, resolution, generator), device)
    val = place_split(random_split(val_images, shapes, resolution, generator), device)
    space = SearchSpace(stage="joint")
    rng = random.Random(args.seed)
    codes = [("nasfcos", zoo_arch("nasfcos")), ("fcos", zoo_arch("fcos"))]
    codes += [(f"random-{k}", space.sample(rng)) for k in range(args.random_codes)]

    print(f"device {device_name} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}; features of {backbone} at {resolution}x{resolution}, decoder width "
          f"{settings.width}; {settings.iters} iterations x batch {settings.batch_size} (pool of {pool} images), "
          f"{val_images} validation images; deform_impl {settings.deform_impl}, amp {settings.amp}", flush=True)
    warmup = replace(settings, iters=2)  # kernels compile and autotune once per process, not per candidate
    for _, code in codes[:2]:
        bench_one(code, shapes, train, val, warmup, recipe, resolution, device, False)

    header = f"{'candidate':<10} {'params M':>8} {'GFLOPs':>7} {'train s':>8} {'ms/iter':>8} {'val s':>6}"
    header += f" {'score s':>7}" if args.score else ""
    header += f" {'total s':>8} {'peak GB':>8}"
    print(header)
    rows = []
    for name, code in codes:
        row = {"candidate": name, "code": str(code),
               **bench_one(code, shapes, train, val, settings, recipe, resolution, device, args.score)}
        rows.append(row)
        line = (f"{name:<10} {row['params_m']:8.2f} {row['gflops']:7.2f} {row['train_s']:8.1f} "
                f"{row['ms_per_iter']:8.0f} {row['val_s']:6.1f}")
        line += f" {row['score_s']:7.1f}" if args.score else ""
        print(line + f" {row['total_s']:8.1f} {row['peak_gb']:8.1f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": device_name, "settings": repr(settings), "resolution": resolution,
                                         "val_images": val_images, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
