"""Serving: the one-shot question pipeline and faster-whisper transcripts with hallucination defences."""
