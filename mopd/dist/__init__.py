"""Distributed plumbing: Ray actors and their restarts (``actors``), the placement group (``placement``),
starting Ray and its environment (``runtime``), devices (``devices``), the trainer -> rollout weight
sync (``weight_sync``), vLLM version shims (``vllm_compat``), lazy imports (``lazy``) and the memory
plan of a recipe on a cluster (``plan``).

The algorithm (objective, loop, data, domains, checkpoints) lives beside this package in ``mopd/``
and does not import it; the worker packages and the app do.
"""
