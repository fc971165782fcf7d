"""Fine-tuning a backbone on labelled folders."""
