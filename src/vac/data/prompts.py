"""Built-in chat prompts in three disjoint sets: ``calib`` (the dense model's own answers to them can
calibrate a compression), ``search`` (chat fidelity for decisions: defaults, search) and ``eval``
(held out: the chat-fidelity figure of :mod:`vac.core.fidelity` that is reported). Written for vac
(no licence question); the kinds match in every set: arithmetic, explanation, how-to, writing,
advice, lists, code.
"""

from __future__ import annotations

from ..errors import VacError

PROMPTS: dict[str, tuple[str, ...]] = {
    "calib": (
        "What is 23 + 58? Show your work.",
        "What is 9 times 12? Explain how you got it.",
        "Why is the sky blue?",
        "Explain what a database index is to a beginner.",
        "How do I boil an egg so the yolk stays soft?",
        "How do I change a flat tyre on a bicycle?",
        "Write a short poem about autumn leaves.",
        "Write a two-sentence story about a lost key.",
        "I have an exam tomorrow and I am nervous. Any advice?",
        "How can I sleep better at night?",
        "List three uses of a paperclip.",
        "Name four planets of the solar system.",
        "Write a Python function that returns the largest number in a list.",
        "What does the command `ls -l` do?",
        "Summarize the water cycle in three sentences.",
        "What is the difference between weather and climate?",
        "Translate 'good morning' into French and Spanish.",
        "Give me a recipe for a simple tomato soup.",
        "What is a prime number? Give two examples.",
        "If a train travels 60 km in 45 minutes, what is its speed in km/h?",
        "Write a polite email declining a meeting invitation.",
        "What are the main causes of inflation?",
        "Explain recursion with a simple example.",
        "What should I pack for a weekend hiking trip?",
    ),
    "search": (
        "What is 64 - 29? Show your work.",
        "What is 8 times 15? Explain how you got it.",
        "Why does ice float on water?",
        "Explain what a web browser does to a beginner.",
        "How do I wash a wool sweater?",
        "Write a short poem about a mountain.",
        "I want to learn to cook. Where should I start?",
        "List three uses of a spoon besides eating.",
        "Write a Python function that counts the vowels in a string.",
        "What does the command `pwd` do?",
        "What is the difference between a lake and a sea?",
        "What should I do if I miss my train?",
    ),
    "eval": (
        "What is 38 + 47? Show your work.",
        "What is 7 times 14? Explain how you got it.",
        "Why do leaves change colour in autumn?",
        "Explain what an operating system does to a beginner.",
        "How do I make a cup of tea?",
        "How do I plant tomato seeds?",
        "Write a short poem about the sea.",
        "Write a two-sentence story about a talking cat.",
        "I start a new job next week. Any advice?",
        "How can I stay focused while studying?",
        "List three uses of a rubber band.",
        "Name four countries in South America.",
        "Write a Python function that reverses a string.",
        "What does the command `cd ..` do?",
        "Summarize how plants make food in three sentences.",
        "What is the difference between a virus and a bacterium?",
        "Translate 'thank you' into German and Italian.",
        "Give me a recipe for pancakes.",
        "What is an even number? Give two examples.",
        "If a car uses 6 litres of fuel per 100 km, how much does it use for 250 km?",
        "Write a short thank-you note to a teacher.",
        "What are the benefits of regular exercise?",
        "Explain what a loop is in programming with a simple example.",
        "What should I bring to a picnic?",
    ),
}


def prompts(split: str) -> tuple[str, ...]:
    if split not in PROMPTS:
        raise VacError(f"unknown prompt split {split!r}; choose one of {', '.join(PROMPTS)}")
    return PROMPTS[split]
