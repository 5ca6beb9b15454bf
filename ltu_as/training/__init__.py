"""Training: Open-ASQA records, the precomputed feature store, the three-stage curriculum trainer (stage
configs in `stages/`) and evaluation."""
