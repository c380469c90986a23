"""Reports: tables, plots and TensorBoard writers; one module per report.
"""
