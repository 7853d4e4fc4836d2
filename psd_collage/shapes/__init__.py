"""The ``shapes`` world and model: a small synthetic world with known ground truth, and a
latent diffusion model trained on it (``--model shapes``) that really draws.

:mod:`.world` draws scenes, :mod:`.psd` writes them as layered PSDs, :mod:`.model` builds
the architecture, :mod:`.train` trains it. Importing this package imports none of them.
"""
