"""Simulated training stamps: the scene of each stamp (centre source, field, backgrounds,
detector defects), sources injected into real backgrounds; written as stores."""
