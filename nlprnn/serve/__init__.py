"""python -m nlprnn.serve: an HTTP service over an exported bundle, with dynamic batching.

Needs the serve extra (`pip install "nlprnn[serve]"`); like `nlprnn.deploy`, it imports neither torch
nor Lightning.
"""
