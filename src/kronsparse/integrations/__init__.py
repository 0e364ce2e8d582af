"""Bridges to training frameworks (each an optional extra)."""
