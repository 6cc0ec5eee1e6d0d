"""Training internals: packed-row collator, loss, attention backends and probe, the domain mixture,
memory options (activation offload, tiled MLP) and the CPT/SFT trainers."""
