"""Tests of pyowt train: data, checkpoints and exact resume, CLI errors, figures."""
