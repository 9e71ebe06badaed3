"""mopd: Multi-Teacher On-Policy Distillation for Mixture-of-Experts students.

Importing ``mopd`` loads no Ray, vLLM or DeepSpeed; those come with the actors that need them.
"""

__version__ = "0.1.0"
