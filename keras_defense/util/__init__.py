"""Small shared utilities: the Keras choice (``compat``), errors, atomic I/O, file locks,
progress, provenance and randomness. Imports nothing else of keras_defense.
"""
