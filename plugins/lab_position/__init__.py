"""GPT-2's positions."""
from lab import hookimpl

from lab_position.learned import LearnedConfig, LearnedPosition


@hookimpl
def lab_components(register):
    register("position", "learned", LearnedPosition, LearnedConfig,
             "learned absolute position embeddings added to the tokens (GPT-2)")
