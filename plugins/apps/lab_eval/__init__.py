"""`lab eval`: perplexity and bits per byte of a run on text, multiple-choice tasks from local
files, and lm-evaluation-harness tasks. An application on top of the core's scoring
(lab/inference/scoring.py), added through the `lab_commands` hook; lm-eval is the optional extra `eval`."""

from lab import hookimpl
from lab.plugins import lazy_command


@hookimpl
def lab_commands(subparsers):
    p = subparsers.add_parser(
        "eval",
        help="score a run: loss, perplexity and bits per byte on text; "
        "multiple-choice tasks; lm-evaluation-harness tasks",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument(
        "--text",
        nargs="+",
        default=[],
        metavar="FILE",
        help='text files, .jsonl files (a "text" field per line) or data folders from lab prepare',
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        default=[],
        metavar="FILE",
        help='multiple-choice .jsonl files: {"context", "choices", "label"} or HellaSwag\'s format',
    )
    p.add_argument(
        "--harness",
        default=None,
        metavar="TASKS",
        help="lm-evaluation-harness tasks, comma-separated (needs pip install 'lab[eval]')",
    )
    p.add_argument("--include-path", default=None, metavar="DIR", help="a folder of lm-eval task YAML files")
    p.add_argument(
        "--limit", type=int, default=None, metavar="N", help="score only the first N items of each task"
    )
    p.add_argument(
        "--stride",
        type=int,
        default=None,
        metavar="S",
        help="tokens between the starts of text windows (default: half the block size)",
    )
    p.add_argument(
        "--batch-size", type=int, default=8, metavar="B", help="windows or choices per forward pass"
    )
    p.add_argument("--device", default="auto")
    p.set_defaults(func=lazy_command("lab_eval.command", "cli_eval"))
