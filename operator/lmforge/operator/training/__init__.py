"""The training kinds (FinetuneJob, AlignmentJob): render, lifecycle, reconcile."""
