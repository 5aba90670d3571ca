"""The Stanford Alpaca prompt template (Taori et al., 2023), with and without an input.

The prompt ends with ``"### Response:\\n"``; the model's answer (the example's ``output``) follows it
directly. An example whose ``input`` is empty or whitespace-only uses the no-input variant.
"""

from __future__ import annotations

from .sources import Example

__all__ = ["PROMPT_WITH_INPUT", "PROMPT_NO_INPUT", "format_prompt"]

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(ex: Example) -> str:
    """The prompt for ``ex`` (everything before the response). Fields are inserted verbatim."""
    if ex.input.strip():
        return PROMPT_WITH_INPUT.format(instruction=ex.instruction, input=ex.input)
    return PROMPT_NO_INPUT.format(instruction=ex.instruction)
