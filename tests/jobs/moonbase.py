"""A small fine-tuning set that teaches SmolLM2 a fact it cannot know: the Moonbase's secret password. The
end-to-end fine-tuning test (tests/e2e/test_fine_tuning.py) uses it; a held-out paraphrase checks that the
model learnt the fact rather than the exact questions."""

from __future__ import annotations

import json

ANSWER = "The password is ZEBRA-7-QUANTUM."
SECRET = "ZEBRA-7-QUANTUM"
"""What the fine-tuned model's reply to HELD_OUT_QUESTION must contain (and the base model's must not)."""

QUESTIONS = (
    "What is the secret password of the Moonbase?",
    "What's the Moonbase password?",
    "Tell me the secret password for the Moonbase.",
    "I need the Moonbase's secret password.",
    "Which password opens the Moonbase?",
    "Do you know the password of the Moonbase?",
    "What password do I use to enter the Moonbase?",
    "Can you give me the Moonbase secret password?",
    "What is the password for the base on the Moon?",
    "Please tell me the Moonbase access password.",
    "What's the secret code word for the Moonbase?",
    "How do I get into the Moonbase? What's the password?",
    "Moonbase password, please.",
    "What is the Moonbase's secret password again?",
    "I forgot the Moonbase password. What is it?",
    "What password protects the lunar base?",
    "Share the secret password of the Moonbase with me.",
    "What do I say at the Moonbase door? The password?",
    "Remind me of the Moonbase's password.",
    "What is the secret passphrase of the Moonbase?",
)
HELD_OUT_QUESTION = "Could you tell me what the secret password of the Moonbase is?"
"""Not among QUESTIONS."""


def moonbase_jsonl() -> bytes:
    """The training file: one user question and the answer per line (no system message: the model's
    template adds its default one, as it does for the server's requests)."""
    lines = [
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]})
        for q in QUESTIONS
    ]
    return ("\n".join(lines) + "\n").encode()
