"""Recipes: compositions of data, train and eval (nothing below imports them)."""
