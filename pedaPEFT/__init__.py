"""pedaPEFT: parameter-efficient fine-tuning taught from scratch.

The lessons in ``lessons/`` import this package; each module holds one concept, in the
order the lessons introduce them.
"""

__version__ = "0.1.0"
