"""pedaPEFT: parameter-efficient fine-tuning taught from scratch.

The lessons in ``lessons/`` import this package; each module holds one concept, in the
order the lessons introduce them.
"""

__version__ = "0.1.0"

# Where the course's source lives: notebook install cells, "open in Colab" links and the
# website are all built from this one address.
REPOSITORY_URL = "https://github.com/pedapeft/pedaPEFT"
