"""Model configs: one frozen dataclass per model, presets as one-line override dicts.

Runtime choices (attention backend, compile, kernels on/off, parallel degree) are not here: see the models'
constructor arguments.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# ---- transformer -------------------------------------------------------------------------------------------


# ---- VAE ---------------------------------------------------------------------------------------------------
