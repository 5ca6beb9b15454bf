"""The 32 (here: 4) pooled pre-LN layer states, against a hand-written pass through the stock encoder."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from ltu_as.model.encoder import load_whisper_encoder


def manual_pooled_states(encoder, mel: torch.Tensor, pool: int) -> torch.Tensor:
    """Whisper's encoder written out: conv → positions[:P] → blocks; keep each block's raw output."""
    x = torch.nn.functional.gelu(encoder.conv1(mel))
    x = torch.nn.functional.gelu(encoder.conv2(x)).permute(0, 2, 1)  # [B, P, D]
    x = x + encoder.embed_positions.weight[: x.shape[1]]
    states = []
    for layer in encoder.layers:
        x = layer(x, None)
        x = x[0] if isinstance(x, tuple) else x
        states.append(x)
    h = torch.stack(states, dim=1)  # [B, L, P, D]
    b, l, p, d = h.shape
    return h.reshape(b, l, p // pool, pool, d).mean(dim=3)


def test_features_are_pooled_pre_layernorm_block_outputs(loaded, clip) -> None:
    model, processor = loaded.model, loaded.processor
    cfg = model.config
    mel = torch.stack([processor.mel(clip), processor.mel(clip[: 16000 * 2])])
    feats = model.audio_features(mel)
    assert feats.shape == (2, cfg.n_audio_layers, cfg.n_audio_tokens, cfg.d_audio) == (2, 4, 25, 64)
    with torch.no_grad():
        expected = manual_pooled_states(model.whisper_encoder, mel, cfg.pool)
        post_ln = model.whisper_encoder(mel).last_hidden_state
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-5)
    # The last state is the raw block output, not the one after the final layer_norm.
    pooled_post_ln = post_ln.reshape(2, 25, 20, -1).mean(2)
    assert not torch.allclose(feats[:, -1], pooled_post_ln, atol=1e-2)


def test_encoder_uses_first_positions_of_saved_table(tiny) -> None:
    encoder = load_whisper_encoder(tiny.whisper, 500)
    saved = load_file(str(tiny.whisper / "model.safetensors"))["model.encoder.embed_positions.weight"]
    assert saved.shape[0] == 1500 and encoder.embed_positions.weight.shape[0] == 500
    torch.testing.assert_close(encoder.embed_positions.weight, saved[:500])
    torch.testing.assert_close(
        encoder.layers[0].fc1.weight,
        load_file(str(tiny.whisper / "model.safetensors"))["model.encoder.layers.0.fc1.weight"],
    )
    assert not any(p.requires_grad for p in encoder.parameters())


def test_features_differ_from_padding_the_mel_to_3000(loaded, clip) -> None:
    """Running the 1500-position encoder on a 3000-frame mel lets attention see the padding: not equivalent."""
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    model = loaded.model
    full = WhisperEncoder(
        model.whisper_encoder.config.__class__(
            **{**model.whisper_encoder.config.to_dict(), "max_source_positions": 1500}
        )
    ).eval()
    state = {k: v for k, v in model.whisper_encoder.state_dict().items() if k != "embed_positions.weight"}
    full.load_state_dict(state, strict=False)
    with torch.no_grad():
        full.embed_positions.weight[:500] = model.whisper_encoder.embed_positions.weight
        mel = loaded.processor.mel(clip)[None]
        padded = torch.nn.functional.pad(mel, (0, 2000))
        ours = model.audio_features(mel)
        from ltu_as.model.encoder import pooled_layer_states

        theirs = pooled_layer_states(full, padded, 20)[:, :, :25]
    assert not torch.allclose(ours, theirs, atol=1e-3)
