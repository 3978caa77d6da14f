"""Lesson 5's exercises."""

from pedaPEFT.exercise_bank.base import Exercise

EXERCISES: list[Exercise] = []
