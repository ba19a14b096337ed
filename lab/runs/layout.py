"""The names of what a run folder holds: every command that reads or writes one uses these.

recipe.toml      the resolved recipe
metrics.jsonl    one JSON line per logged step and per evaluation (lab.runs.metrics)
loss.png         the curves
checkpoints/     step_NNNNNNN/, each complete once its COMPLETE marker is written (lab.runs.checkpoint)
tokenizer/       copies of a trained tokenizer's files, named in files.json (lab.runs.tokenizer_files)
generated.txt    the sample written at the end of training
eval.json        what `lab eval` measured
.lock            held by the one process writing the folder (lab.runs.lock)
"""

RECIPE = "recipe.toml"
METRICS = "metrics.jsonl"
PLOT = "loss.png"
CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"  # written last into a checkpoint folder: without it, the folder is debris
TOKENIZER = "tokenizer"
TOKENIZER_MANIFEST = "files.json"
SAMPLES = "generated.txt"
EVAL = "eval.json"
LOCK = ".lock"
