"""The SPIEncoder VAE (Zhuang, Ayyer et al., IUCrJ 2022): 2D class averages with their
orientations -> a continuous latent -> point-group symmetric 3D intensity volumes.

``model`` networks, symmetry and Ewald slicing; ``data`` inputs and normalisation; ``train`` the
loop (DDP, bf16, checkpoints); ``analysis`` volumes along the latent, per-frame latents and
outputs; ``figures`` the plots.
"""
