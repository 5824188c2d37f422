"""The suite registry: name -> Suite. Suite modules import their targets (cogvideox, kernels, diffusers) lazily,
inside cases() / build(), so listing suites never fails on a missing target."""
from __future__ import annotations

from . import attention, e2e, kernels, model, parallel, train, vae, vae_parallel

SUITES = {s.name: s for s in (kernels.SUITE, attention.SUITE, model.SUITE, vae.SUITE, e2e.SUITE, train.SUITE,
                              parallel.SUITE)}
SUITES[vae_parallel.SUITE.name] = vae_parallel.SUITE
