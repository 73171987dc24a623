"""
Below the fold: what the method's six files stand on, none of it reinforcement learning.

    toy.py                the toy world: a shapes grammar, an exact renderer, an exact verifier
    recipes.py            the published recipes as presets (--preset toy / sd35 / dance / dance-lora)
    runtime.py            user errors, the one entry point, flag ranges, torchrun, FSDP2, seeds, image grids
    prompts.py            prompt files, the toy grammar's splits, named public sets downloaded once
    lora.py               LoRA adapters through peft, saved in the diffusers LoRA format
    checkpoints.py        a run's folder: checkpoints and checked resume
    metrics.py            a training iteration's metrics and metrics.jsonl
    tables_and_figures.py tables (mean +- s.e., paired deltas, the toy breakdown), image grids, L1rel plot
    models.py             FLUX, SD3 and the toy model behind one FlowModel interface, and their loading
    reward_loading.py     reward checkpoints into transformers modules: files offline first, key maps
    reward_inputs.py      what reward models read, prepared as their own code prepares it

Imports go one way: a module here imports only modules listed above it, and nothing of the top level.
"""
