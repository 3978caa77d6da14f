"""The course's lessons as package data: installed as ``pedaPEFT.lessons`` (see pyproject.toml).

``python -m pedaPEFT lessons --copy DIR [--student]`` copies them out of an installed package.
"""
