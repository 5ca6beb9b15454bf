"""Audio in: sources (microphone, file, satellite), the per-stream ring buffer, level meter and VAD."""
