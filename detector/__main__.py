"""``python -m detector <command> key=value ...``: train, evaluate and inspect detectors."""
from detector.cli import Command, dispatch

COMMANDS = {
    "train": Command("detector.commands.train:train_command", "train a detector from arch=<code|zoo name|file|search run dir>"),
    "eval": Command("detector.commands.eval:eval_command", "COCO metrics of ckpt=<file> on the val split"),
    "infer": Command("detector.commands.infer:infer_command", "draw detections of ckpt=<file> on images=<path> into out=<dir>"),
    "describe": Command("detector.commands.describe:describe_command", "params per part and GFLOPs of arch=<code> [format=json]"),
    "bench": Command("detector.commands.bench:bench_command", "training/inference throughput against torchvision FCOS",
                     config="bench"),
    "synth": Command("detector.commands.synth:synth_command", "write the synthetic COCO-format dataset to out=<dir>"),
    "summary": Command("detector.commands.summary:summary_command", "metrics table of a sweep directory sweep=<dir>"),
    "export": Command("detector.deploy.onnx_export:export_command", "write ckpt=<file> (or arch=<code>) as out=<file>.onnx [check=true]"),
    "check-export": Command("detector.deploy.export_check:check_export_command", "parity of onnx=<file> against its ckpt / arch"),
    "latency": Command("detector.deploy.latency:latency_command", "inference latency (median, p90) of arch=<code> on this device"),
}

if __name__ == "__main__":
    dispatch("detector", "train", COMMANDS)
