"""Recipes from other trainers' configuration files."""
