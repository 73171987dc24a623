"""
Scripts that are not the method: each runs from the repository root as `python -m scripts.NAME`.

    bench.py            what an iteration costs, phase by phase, against its compute floor
    pretrain_toy.py     pretrains the toy model and rebuilds assets/toy/
    ablations.py        Chunk-GRPO's ablations on the toy world, with seeds, a control and learning curves
    gradient_snr.py     is a batch big enough? the cosine between independent batches' policy gradients
    signal_vs_drift.py  does an update learn, or only drift? each setting against its shuffled-reward twin
"""
