"""Analyses that inform data selection (LongRecipe impactful tokens)."""
