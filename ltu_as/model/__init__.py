"""The model: architecture config, log-mel audio, Whisper encoder, TLTR and projector, the composed
LTU-AS model, its processor and prompt, and decoding. Imports nothing from the other subpackages."""
