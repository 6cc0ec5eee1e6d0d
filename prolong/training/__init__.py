"""Training internals: packed-row collator, loss, attention backends and probe, the domain mixture,
memory options (activation offload, tiled MLP), the training-argument checks and the CPT/SFT trainers."""
