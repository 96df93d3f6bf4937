"""Binary (yes/no) decision prompts: an instruction naming both candidates, a question, a gold label."""

from __future__ import annotations

#: Instruction templates; each names both candidates, in either order.
INSTRUCTIONS: list[str] = [
    "Answer Yes or No.",
    "Answer No or Yes.",
    "Reply with Yes or No.",
    "Reply with No or Yes.",
]

POSITIVE, NEGATIVE = " Yes", " No"


def format_binary_prompt(instruction: str, question: str) -> str:
    """The prompt whose next token is the decision (' Yes' or ' No')."""
    return f"{instruction}\nQuestion: {question}\nAnswer:"
