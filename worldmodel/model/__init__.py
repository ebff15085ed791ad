"""The model: tensors in, losses and rollouts out (docs/architecture.md, "WorldModel").

Modules: config (ModelConfig, the model's whole configuration), world_model (WorldModel: forward and rollout),
encoder (ViT per frame, EMA target encoder, token normalisation, the keypoint head), predictor (frame-causal
transformer with AdaLN conditioning), latents (the latent r: none | adassl_v | adassl_s | oracle), distributions (the
inferred latents' Gaussian KL and straight-through Bernoulli mask), summaries (what the inferred latents read),
objectives (the JEPA loss, copy-last), monitors (collapse and drift monitors), sigreg (SIGReg). Nothing here imports
the data pipeline, the worlds, training or evaluation.
"""
