"""Training: the data loader (``dataset.py``) and, beside it, the trainer's modules."""
