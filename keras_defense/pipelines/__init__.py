"""Pipelines: the orchestration that binds data, models, defenses, evaluation and reports
(the staged experiment, the defense comparison, the sweep).
"""
