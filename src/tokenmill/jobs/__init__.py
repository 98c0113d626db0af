"""Work that outlives a request: the Files store, fine-tuning jobs (run by a trainer worker process, not the
gateway) and, later, batches."""
