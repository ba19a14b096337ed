"""AdamW, its weight-decay groups made from the parameters' roles (lab/roles.py); Muon and NorMuon."""

from lab import hookimpl
from lab_optim.adamw import AdamWConfig, adamw
from lab_optim.muon import MuonConfig, NorMuonConfig, muon


@hookimpl
def lab_components(register):
    register(
        "optimizer",
        "adamw",
        adamw,
        AdamWConfig,
        "AdamW; weight decay for every parameter role but vectors, gains and biases",
    )
    register(
        "optimizer",
        "muon",
        muon,
        MuonConfig,
        "Muon (orthogonalised momentum) for hidden matrices, AdamW for embedding, head and vectors",
    )
    register(
        "optimizer",
        "normuon",
        muon,
        NorMuonConfig,
        "NorMuon: Muon with Polar Express, then per-neuron second-moment normalisation; cautious decay",
    )
