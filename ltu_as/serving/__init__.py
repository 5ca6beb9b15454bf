"""Serving: the decode engine (continuous batching over a slot KV cache, `engine`, with its batched logits
pipeline, `sampling`), the one-shot question pipeline, sentence embeddings and faster-whisper transcripts with
hallucination defences."""
