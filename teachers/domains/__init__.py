"""Built-in synthetic domains (math, code, agent); importing this package registers them.

Each registers ``<name>`` (its default level) and ``<name>_l1`` .. ``<name>_l3`` with
``mopd.domains.register_domain``; prompts are short, answers exact, and the train and eval splits
are disjoint by a hash of the prompt. See each module's docstring for the formats.
"""

from teachers.domains import agent, code, math  # noqa: F401  (imported to register)
from teachers.domains.common import EVAL_PERCENT, exact_match, format_sft_example, split_of

__all__ = ["EVAL_PERCENT", "exact_match", "format_sft_example", "split_of"]
