"""``python -m detector <command> key=value ...``: train, evaluate and inspect detectors."""
from detector.cli import Command, dispatch

COMMANDS = {
    "train": Command("detector.engine:train_command", "train a detector from arch=<code|zoo name|file|search run dir>"),
    "eval": Command("detector.evaluate:eval_command", "COCO metrics of ckpt=<file> on the val split"),
    "infer": Command("detector.infer:infer_command", "draw detections of ckpt=<file> on images=<path> into out=<dir>"),
    "describe": Command("detector.describe:describe_command", "params per part and GFLOPs of arch=<code> [format=json]"),
    "bench": Command("detector.bench:bench_command", "training/inference throughput against torchvision FCOS"),
    "synth": Command("detector.data.synthetic:synth_command", "write the synthetic COCO-format dataset to out=<dir>"),
    "export": Command("detector.onnx_export:export_command", "write ckpt=<file> (or arch=<code>) as out=<file>.onnx [check=true]"),
    "check-export": Command("detector.export_check:check_export_command", "parity of onnx=<file> against its ckpt / arch"),
    "latency": Command("detector.latency:latency_command", "inference latency (median, p90) of arch=<code> on this device"),
    "summary": Command("detector.sweep_summary:summary_command", "metrics table of a sweep directory sweep=<dir>"),
}

if __name__ == "__main__":
    dispatch("detector", "train", COMMANDS)
