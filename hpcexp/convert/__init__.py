"""Dockerfile -> Apptainer recipe: lexer, interpretation, recipe writer, fidelity report."""
