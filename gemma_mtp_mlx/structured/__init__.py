"""Structured output under exact speculation: JSON schemas, regular expressions and Lark
grammars (`response_format`), through llguidance.

`grammar.py` compiles a `response_format` into a grammar and turns it into a logits
processor: at every position the target's logits are masked to the tokens the grammar
allows after the tokens before that position (verified tokens and the round's drafts
alike). The speculative round already applies logits processors per verified position
with that position's own history, and to the drafter's distribution where drafts are
sampled, so the output follows the constrained target exactly: greedy speculative output
equals greedy constrained plain decoding, and sampled output has the constrained
distribution.
"""
