"""Evaluation: the attack grid, the AutoAttack runner and its result types, threat models,
Wilson statistics, gradient-masking diagnostics and the distributed attack.
"""
