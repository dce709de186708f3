"""Differential fuzzing of attnopt: generated attention modules run eager, compiled and exported."""
