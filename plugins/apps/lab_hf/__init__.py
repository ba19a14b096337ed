"""GPT-2 and Llama interop with transformers: `lab import-hf` and `lab export-hf`. A plugin, not the core,
because it names GPT-2's and Llama's components. It needs safetensors and torch, not transformers."""

from lab import hookimpl
from lab.plugins import lazy_command


@hookimpl
def lab_commands(subparsers):
    p = subparsers.add_parser(
        "import-hf", help="turn a local transformers GPT-2 or Llama folder into a lab run folder"
    )
    p.add_argument(
        "hf_dir",
        metavar="HF_DIR",
        help="a folder save_pretrained wrote: config.json and model.safetensors or pytorch_model.bin",
    )
    p.add_argument("--out", required=True, metavar="RUN_DIR")
    p.set_defaults(func=lazy_command("lab_hf.import_hf", "cli_import"))

    p = subparsers.add_parser("export-hf", help="write a GPT-2 or Llama run folder as a transformers folder")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", required=True, metavar="HF_DIR")
    p.set_defaults(func=lazy_command("lab_hf.export_hf", "cli_export"))
