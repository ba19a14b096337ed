"""What the `lab serve` tests share: tiny run folders, and a real server on a free loopback port."""

import json
import threading
import time
from pathlib import Path

from test_generate import TINY, tiny_model

from lab.recipe import load_recipe
from lab.runs.checkpoint import save

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "gpt_small.toml"
WIDER = ["model.vocab_size=50257", "model.block_size=64"]  # GPT-2's tokenizer; room for a prompt and a reply


def make_run(folder, seed=0, steps=6) -> Path:
    """A run folder as lab run leaves it: a checkpoint of test_generate's tiny model (large random
    weights, so greedy choices are no near-ties) with GPT-2's vocabulary, recipe.toml, metrics.jsonl
    with train and val losses, generated.txt."""
    folder = Path(folder)
    recipe = load_recipe(RECIPE, TINY + WIDER)
    model = tiny_model(RECIPE, vocab_size=50257, seed=seed, overrides=WIDER[1:])
    save(folder, steps, model, recipe.to_toml(), {})
    (folder / "recipe.toml").write_text(recipe.to_toml())
    lines = [{"step": 0, "val_loss": 11.0}]
    for s in range(1, steps + 1):
        lines.append(
            {
                "step": s,
                "loss": 11.0 - s * 0.5,
                "lr": 1e-3,
                "grad_norm": 1.0,
                "tokens_per_s": 1000.0,
                "mfu": 0.0,
            }
        )
        if s % 3 == 0:
            lines.append({"step": s, "val_loss": 11.0 - s * 0.4})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (folder / "generated.txt").write_text("--- sample 1 ---\nOnce upon a time, a tiny model\n")
    return folder


class Server:
    """uvicorn serving `app` on 127.0.0.1 in a thread, on a port the OS picks."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
