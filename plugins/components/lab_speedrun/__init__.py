"""Today's record-setting wiring (the NanoGPT speedrun, nanochat) as lab plugins, written only
through the documented contracts (docs/writing-plugins.md): value embeddings, U-net skips, smear,
a per-head attention gate, multi-token prediction and z-loss as extensions ([extension.NAME]), and
document masking as an attention (`[model.attention] name = "per_document"`) fed by document-aligned
batches (`[data] documents = true`)."""

from lab import hookimpl
from lab_speedrun.documents import DocumentAttention, DocumentsConfig
from lab_speedrun.wiring import (
    AttentionGate,
    GateConfig,
    MTPConfig,
    MultiTokenPrediction,
    Smear,
    SmearConfig,
    UNetConfig,
    UNetSkips,
    ValueEmbeddings,
    ValueEmbeddingsConfig,
    ZLoss,
    ZLossConfig,
)

EXTENSIONS = [
    (
        "value_embeddings",
        ValueEmbeddings,
        ValueEmbeddingsConfig,
        "token embeddings added to attention's values, tables shared by layers (speedrun)",
    ),
    (
        "unet",
        UNetSkips,
        UNetConfig,
        "U-net skips: block i's output into block n-1-i, learned weights (speedrun)",
    ),
    (
        "smear",
        Smear,
        SmearConfig,
        "each token's embedding takes in a gated share of the previous one's (speedrun)",
    ),
    (
        "attention_gate",
        AttentionGate,
        GateConfig,
        "per-head sigmoid gate on attention's output (speedrun, gated attention)",
    ),
    (
        "mtp",
        MultiTokenPrediction,
        MTPConfig,
        "multi-token prediction: extra heads for tokens further ahead, an extra loss",
    ),
    ("z_loss", ZLoss, ZLossConfig, "z-loss, weight * mean(log Z ^ 2), inside the fused loss (PaLM)"),
]


@hookimpl
def lab_components(register):
    for name, factory, config, description in EXTENSIONS:
        register("extension", name, factory, config, description)
    register(
        "attention",
        "per_document",
        DocumentAttention,
        DocumentsConfig,
        "causal attention within each document (Flex document block mask on CUDA, masked SDPA elsewhere)",
    )
