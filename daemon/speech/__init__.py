"""Speech: the ASR worker thread (faster-whisper) shared by every stream; finals first, partials latest-wins."""
