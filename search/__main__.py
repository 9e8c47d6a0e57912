"""``python -m search <command> key=value ...``: search for a decoder, inspect codes and runs."""
from detector.cli import Command, dispatch

COMMANDS = {
    "run": Command("search.run:run_command", "run (or resume=<run_dir>) a search: prepare, stages, report",
                   machine_defaults="search.proxy_default:proxy_for_machine"),
    "prepare": Command("proxy_eval.prepare:prepare_command", "adapt the backbone and cache proxy features"),
    "report": Command("search.report:report_command", "write report.md and plots for run=<run_dir>"),
    "show": Command("search.show:show_command", "decode arch=<code> and draw its diagram"),
    "sample": Command("search.show:sample_command", "print n=<k> random valid codes for seed=<s>"),
}

if __name__ == "__main__":
    dispatch("search", "search", COMMANDS)
